"""Tune specs (cmscale.tune.spec): hostile values in every field are accepted and round-trip or are refused
naming the field; study and profile names are single folder names."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner
from hostile_input import (
    RUN_BASE,
    RUN_PATHS,
    SETTINGS,
    finite,
    hostile_values,
    names_field,
    refused_writes_nothing,
    set_path,
    toml_round_trip,
)
from hypothesis import given
from hypothesis import strategies as st

from cmscale.cli import main
from cmscale.cluster.profiles import load_profile
from cmscale.config import safe_path_component
from cmscale.sweep.spec import SpecError, parse_spec
from cmscale.tune.spec import TuneSpecError, load_tune_spec, parse_tune_spec

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


def edm_spec(**changes) -> dict:
    return {"name": "s", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e8], "methods": {"edm": {}}} | changes


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


def test_study_and_profile_names_are_safe_components(tmp_path):
    base = {"method": "edm", "preset": "xxs", "budget_iters": 2}
    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}
    with pytest.raises(TuneSpecError, match=r"  - name: .*not a safe folder name"):
        parse_tune_spec({"name": "../study", "n_trials": 1, "base": base, "space": space})
    with pytest.raises(TuneSpecError, match=r"executor.profile"):
        parse_tune_spec({"name": "t", "n_trials": 1, "base": base, "space": space,
                         "executor": {"profile": "../../etc/x"}})
    with pytest.raises(SpecError, match=r"executor.profile"):
        parse_spec(edm_spec(executor={"profile": "../p"}))
    with pytest.raises(Exception, match="profile: '../../x' is not a safe folder name"):
        load_profile("../../x")
    assert safe_path_component("run-1.a_b") == "run-1.a_b"


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(tomli_w.dumps(spec))
    return path


def test_missing_teacher_checkpoint_is_named_in_the_error(tmp_path):
    spec = {"name": "noteacher", "n_trials": 1, "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
            "base": {"method": "ect", "preset": "xxs", "budget_iters": 8, "teacher_ckpt": "missing/final.pt"}}
    with pytest.raises(TuneSpecError, match=r"base\.teacher_ckpt: .*missing/final\.pt not found"):
        load_tune_spec(write_spec(tmp_path / "noteacher.toml", spec))


@pytest.mark.parametrize(("param", "path", "message"), [
    ({"lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "space.lr.low", "must be <= high"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "space.lr.low", "log scale needs low > 0"),
    ({"ect": {"qq": {"type": "float", "low": 2.0, "high": 4.0}}}, "space.ect.qq", "unknown parameter"),
    ({"ect": {"q": {"type": "float", "low": 0.5, "high": 4.0}}}, "space.ect.q.low", "greater than 1"),
    ({"lr": {"type": "normal", "low": 0.1, "high": 1.0}}, "space.lr", "does not match any of the expected tags"),
])
def test_invalid_search_space_is_rejected_with_file_and_field_path(tmp_path, param, path, message):
    (tmp_path / "teacher.pt").write_bytes(b"")  # validation only checks that it exists
    spec = {"name": "bad", "n_trials": 2, "space": param,
            "base": {"method": "ect", "preset": "xxs", "budget_iters": 8, "teacher_ckpt": str(tmp_path / "teacher.pt")}}
    spec_path = write_spec(tmp_path / "bad.toml", spec)
    with pytest.raises(TuneSpecError) as error:
        load_tune_spec(spec_path)
    text = str(error.value)
    assert text.startswith(f"{spec_path}: invalid tune spec")
    assert f"  - {path}: " in text and message in text
    result = CliRunner().invoke(main, ["tune", "run", str(spec_path), "--root", str(tmp_path / "r")])
    assert result.exit_code != 0 and f"- {path}: " in result.output and "Traceback" not in result.output
