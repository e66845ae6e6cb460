"""Validation as a property (issue 13): random and hostile values into every field of the run config, the sweep
spec, the tune spec and the profile.

For each input: either it is accepted and round-trips (JSON, and TOML where TOML can hold it), or it is refused
with a message that names the field, and the command given that input writes nothing. Examples are drawn
deterministically (derandomize) and kept few: the whole module runs in well under a minute on two cores.
"""

from __future__ import annotations

import copy
import math
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cmscale.cli import main
from cmscale.cluster.profiles import Profile, load_profile
from cmscale.config import ConfigError, RunConfig, format_validation_error
from cmscale.sweep.plan import plan_sweep
from cmscale.sweep.spec import ExecutorSpec, LogSpace, SpecError, SweepSpec, TeacherSpec, parse_spec
from cmscale.tune.spec import TuneSpecError, parse_tune_spec, run_setting_paths

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

HOSTILE_TEXT = ["../escape", "/tmp/abs", "..", ".", "", "a/b", ".hidden", "x\x00y", "é", "a b", "ok_name", "cuda:0",
                "auto", "cpu", "xxs", "xs", "digits", "cifar10", "edm", "ect", "sigmoid", "l2", "tpe", "local", "1e3"]
scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 0.999, 1.5, -1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 3, 4, 7, 8, 16, 18, 32, 1024, 10**9]),
    st.booleans(),
    st.sampled_from(HOSTILE_TEXT),
    st.text(max_size=8),
)
hostile_values = st.one_of(
    scalars,
    st.none(),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["a", "q", "lr", "type"]), scalars, max_size=2),
)

RUN_PATHS = sorted(run_setting_paths())
RUN_BASE = {"method": "edm", "preset": "xxs", "budget_iters": 2, "batch_size": 4, "eval": {"at_fractions": []}}


def set_path(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(raw)
    node = changed
    *parents, leaf = path.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return changed


def names_field(message: str, path: str) -> bool:
    """The message names the field: each part of its dotted path appears in it."""
    return all(part in message for part in path.split("."))


def drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: drop_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [drop_none(item) for item in value]
    return value


def toml_round_trip(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` written as TOML and read back; a null inside a free-form table (TOML has none) stays as it is."""
    if drop_none(raw) != raw:
        return raw
    return tomllib.loads(tomli_w.dumps(raw))


def finite(value: Any) -> bool:
    """No NaN or inf anywhere in an accepted input: each would be a budget or a rate never meant."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(item) for item in value)
    return True


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def refused_writes_nothing(args: list[str], file_name: str, raw: dict[str, Any], field: str) -> None:
    """Run the command on the refused input in a fresh folder: it exits 1 naming the field, and writes nothing."""
    if drop_none(raw) != raw:
        return  # TOML has no null: this input cannot be written as a file
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError):
        return  # nor can TOML hold this value (e.g. a NUL in a key)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / file_name).write_text(text)
        root = folder / "root"
        result = CliRunner().invoke(main, [*args, str(folder / file_name), "--root", str(root)])
        assert result.exit_code == 1, (field, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), result.exception  # a clean error, not a traceback
        assert files_under(folder) == [file_name], f"{field}: a refused input wrote {files_under(folder)}"


# -- run config ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(path=st.sampled_from(RUN_PATHS), value=hostile_values)
def test_run_config_accepts_and_round_trips_or_names_the_field(path, value):
    raw = set_path(RUN_BASE, path, value)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        message = format_validation_error("run.toml", error)
        assert names_field(message, path), message
        refused_writes_nothing(["train"], "run.toml", raw, path)
        return
    assert finite(config.model_dump())
    assert RunConfig.model_validate_json(config.model_dump_json()) == config
    assert RunConfig.model_validate(toml_round_trip(config.model_dump(mode="json", exclude_none=True))) == config
    for name in (config.sweep, config.run_id, config.teacher_run_id):
        assert name is None or ("/" not in name and not name.startswith("."))


# -- sweep spec ----------------------------------------------------------------------------------------------------

SWEEP_BASE = {"name": "s", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e12],
              "budgets": {"start": 1e12, "stop": 1e13, "num": 2}, "methods": {"edm": {}}}
SWEEP_PATHS = sorted(
    [name for name in SweepSpec.model_fields]
    + [f"teacher.{name}" for name in TeacherSpec.model_fields]
    + [f"executor.{name}" for name in ExecutorSpec.model_fields]
    + [f"budgets.{name}" for name in LogSpace.model_fields]
    + [f"defaults.{path}" for path in RUN_PATHS]
    + [f"methods.edm.{path}" for path in RUN_PATHS]
)
RUN_SECTIONS = ("defaults.", "methods.edm.", "teacher.overrides.", "base.")


def field_named(path: str) -> str:
    """Values under a section of run settings are reported by the run setting's own path."""
    for prefix in RUN_SECTIONS:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def one_flop(config: RunConfig) -> int:
    return 1  # below any real count, so a budget refused here is refused by the real planner too


@SETTINGS
@given(path=st.sampled_from(SWEEP_PATHS), value=hostile_values)
def test_sweep_spec_accepts_and_round_trips_or_names_the_field(path, value):
    raw = set_path(SWEEP_BASE, path, value)
    try:
        spec = parse_spec(raw, "sweep.toml")
        plan_sweep(spec, Path("/nonexistent-root"), source="sweep.toml", flops_fn=one_flop)
    except SpecError as error:
        assert names_field(str(error), field_named(path)), str(error)
        refused_writes_nothing(["sweep", "launch"], "sweep.toml", raw, path)
        return
    dumped = spec.model_dump(mode="json", exclude_none=True)
    assert finite(spec.model_dump()) and "/" not in spec.name and not spec.name.startswith(".")
    assert parse_spec(dumped) == spec
    assert parse_spec(toml_round_trip(dumped)) == spec


# -- tune spec -----------------------------------------------------------------------------------------------------

TUNE_BASE = {"name": "t", "n_trials": 2, "base": RUN_BASE | {"eval": {"at_fractions": [1.0]}},
             "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}, "objective": {"metrics": ["fid"]}}
TUNE_PATHS = sorted(
    ["name", "n_trials", "workers", "storage", "zombie_after_s", "max_retry", "space", "enqueue", "objective.metrics",
     "objective.directions", "sampler.name", "sampler.seed", "sampler.n_startup_trials", "sampler.multivariate",
     "pruner.name", "pruner.n_startup_trials", "pruner.min_resource", "pruner.reduction_factor", "executor.name",
     "executor.profile", "executor.timeout_min", "space.lr.type", "space.lr.low", "space.lr.high", "space.lr.log",
     "space.lr.step"]
    + [f"base.{path}" for path in RUN_PATHS]
)


@SETTINGS
@given(path=st.sampled_from(TUNE_PATHS), value=hostile_values)
def test_tune_spec_accepts_and_round_trips_or_names_the_field(path, value):
    raw = set_path(TUNE_BASE, path, value)
    try:
        spec = parse_tune_spec(raw, "tune.toml")
    except TuneSpecError as error:
        assert names_field(str(error), path), str(error)
        refused_writes_nothing(["tune", "run"], "tune.toml", raw, path)
        return
    dumped = spec.model_dump(mode="json", exclude_none=True)
    assert finite(spec.model_dump()) and "/" not in spec.name and not spec.name.startswith(".")
    assert parse_tune_spec(dumped) == spec
    assert parse_tune_spec(toml_round_trip(dumped)) == spec


# -- profile -------------------------------------------------------------------------------------------------------


@SETTINGS
@given(path=st.sampled_from(sorted(Profile.model_fields)), value=hostile_values)
def test_profile_accepts_and_round_trips_or_names_the_field(path, value):
    raw = {path: value}
    try:
        text = tomli_w.dumps(drop_none(raw))
    except (TypeError, ValueError):
        return
    with tempfile.TemporaryDirectory() as folder:
        profile_path = Path(folder) / "p.toml"
        profile_path.write_text(text)
        try:
            profile = load_profile(str(profile_path))
        except ConfigError as error:
            assert str(profile_path) in str(error) and names_field(str(error), path), str(error)
            assert files_under(Path(folder)) == ["p.toml"]
            return
    assert finite(profile.model_dump()) and "/" not in profile.name
    assert Profile.model_validate_json(profile.model_dump_json()) == profile
    assert Profile.model_validate(toml_round_trip(profile.model_dump(mode="json", exclude_none=True))) == profile


@pytest.mark.parametrize("name", ["../up", "/etc/passwd", "..", "a/b"])
def test_profile_names_are_single_folder_names(name):
    with pytest.raises(ConfigError, match="not a safe folder name"):
        load_profile(name)
