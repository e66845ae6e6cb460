"""Sweep specs (cmscale.sweep.spec, plan): a spec cannot move its runs to another sweep, a sweep name
names one spec, a grid too large to plan is refused before anything is built, a missing teacher
checkpoint fails planning, and names, seeds and files the store or the file system cannot hold
are refused at the edge, each in one message naming the file and the field; hostile values in every
field accepted and round-tripped or refused naming it; size ladders defined in the spec plan and train."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest
import tomli_w
import torch
from click.testing import CliRunner
from hostile_input import (
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
from pydantic import ValidationError

from cmscale.cli.main import main
from cmscale.config import RunConfig
from cmscale.models.flops import meta_copy
from cmscale.models.presets import build_unet
from cmscale.models.unet import count_parameters
from cmscale.sweep.plan import plan_sweep, read_sweep_file
from cmscale.sweep.spec import (
    MAX_PLANNED_RUNS,
    ExecutorSpec,
    LogSpace,
    SpecError,
    SweepSpec,
    TeacherSpec,
    load_spec,
    parse_spec,
)
from cmscale.train import train

BASE = {"name": "s", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e10], "methods": {"edm": {}},
        "defaults": {"eval": {"at_fractions": []}}}


def one_flop(config) -> int:
    return 1


def write_spec(folder: Path, raw: dict, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(tomli_w.dumps(raw))
    return path


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("section", ["defaults", "methods.edm", "teacher.overrides"])
@pytest.mark.parametrize("field", ["sweep", "run_id", "seed", "method", "preset", "budget_iters", "dataset"])
def test_a_spec_cannot_override_a_runs_identity(section, field):
    raw = json.loads(json.dumps(BASE))
    table = raw
    for part in section.split("."):
        table = table.setdefault(part, {})
    table[field] = "other" if field in ("sweep", "run_id", "method", "preset", "dataset") else 3
    with pytest.raises(SpecError, match=rf"{section}\.{field}: set by the sweep spec itself"):
        parse_spec(raw, "spec.toml")


def test_defaults_sweep_no_longer_lands_runs_under_another_sweep(tmp_path):
    spec = write_spec(tmp_path, BASE | {"defaults": {"sweep": "other"}})
    result = cli("sweep", "launch", str(spec), "--root", str(tmp_path / "root"), "--dry-run")
    assert result.exit_code == 1 and "defaults.sweep" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "root" / "other").exists()


def test_a_grid_above_the_limit_is_refused_fast_and_small():
    raw = BASE | {"presets": ["xxs", "xs"], "methods": {"edm": {}, "sct": {}},
                  "budgets": {"start": 1e10, "stop": 1e12, "num": 1000}, "budgets_flops": [],
                  "seeds": list(range(100))}
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(SpecError, match=r"400,000 runs .* above the limit of 100,000"):
        plan_sweep(parse_spec(raw, "big.toml"), Path("/nonexistent"), source="big.toml", flops_fn=one_flop)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.monotonic() - started < 5 and peak < 50e6
    with pytest.raises(SpecError, match="budgets.num"):
        parse_spec(BASE | {"budgets": {"start": 1, "stop": 2, "num": MAX_PLANNED_RUNS + 1}}, "big.toml")


def test_a_missing_teacher_checkpoint_fails_plan_and_dry_run(tmp_path):
    raw = BASE | {"methods": {"ect": {}}, "teacher": {"checkpoints": {"xxs": str(tmp_path / "missing.pt")}}}
    spec = write_spec(tmp_path, raw)
    for command in (["sweep", "plan"], ["sweep", "launch", "--dry-run"]):
        result = cli(*command, str(spec), "--root", str(tmp_path / "root"))
        assert result.exit_code == 1, result.output
        assert "teacher.checkpoints" in result.output and "xxs = " in result.output and "missing.pt" in result.output
        assert "Traceback" not in result.output
    (tmp_path / "missing.pt").touch()
    assert cli("sweep", "plan", str(spec), "--root", str(tmp_path / "root")).exit_code == 0


@pytest.mark.parametrize("name", ["abc\n", "abc\r", "a/b", ".hidden", "x" * 129])
def test_a_sweep_name_that_is_not_one_plain_folder_name_is_refused(name):
    with pytest.raises(SpecError, match="name"):
        parse_spec(BASE | {"name": name}, "spec.toml")


@pytest.mark.parametrize("seeds", [[2**64], [2**31], [-1]])
def test_a_seed_the_store_cannot_hold_is_refused_when_planning(tmp_path, seeds):
    spec = write_spec(tmp_path, BASE | {"seeds": seeds})
    result = cli("sweep", "plan", str(spec), "--root", str(tmp_path))
    assert result.exit_code == 1 and "seeds.0" in result.output and "Traceback" not in result.output
    assert str(spec) in result.output


def test_a_non_utf8_spec_names_the_file_and_the_byte(tmp_path):
    spec = tmp_path / "latin1.toml"
    spec.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(SpecError, match=r"latin1.toml: not UTF-8 text \(byte 11"):
        load_spec(spec)
    result = cli("sweep", "plan", str(spec))
    assert result.exit_code == 1 and "not UTF-8" in result.output and "Traceback" not in result.output


def test_a_sweep_name_reused_by_another_spec_is_refused_naming_both(tmp_path):
    root = tmp_path / "root"
    first = write_spec(tmp_path, BASE | {"executor": {"name": "debug"}}, "first.toml")
    plan = plan_sweep(load_spec(first), root, source=str(first))
    from cmscale.sweep.plan import write_sweep_file

    write_sweep_file(root, "s", plan, spec_path=str(first.resolve()), spec=load_spec(first))
    second = write_spec(tmp_path, BASE | {"budgets_flops": [1e10, 2e10]}, "second.toml")
    for extra in ([], ["--dry-run"]):
        result = cli("sweep", "launch", str(second), "--root", str(root), *extra)
        assert result.exit_code == 1, result.output
        assert "first.toml" in result.output and "second.toml" in result.output and "--new-version" in result.output
    assert [r["run_id"] for r in read_sweep_file(root, "s")["runs"]] == [run.run_id for run in plan]
    # The same spec again (a relaunch, another executor) is the same sweep.
    write_sweep_file(root, "s", plan, spec_path=str(first.resolve()), spec=load_spec(first), executor="local")
    # --new-version adds the new spec's runs and keeps the earlier ones, so status lists every run.
    result = cli("sweep", "launch", str(second), "--root", str(root), "--new-version", "--dry-run")
    assert result.exit_code == 0, result.output
    second_plan = plan_sweep(load_spec(second), root, source=str(second))
    write_sweep_file(root, "s", second_plan, spec_path=str(second), spec=load_spec(second), new_version=True)
    stored = read_sweep_file(root, "s")
    assert {r["run_id"] for r in stored["runs"]} == {run.run_id for run in plan + second_plan}
    assert len(stored["versions"]) == 2
    # Both versions now name the sweep: relaunching the first spec is accepted.
    write_sweep_file(root, "s", plan, spec_path=str(first), spec=load_spec(first))


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


def edm_spec(**changes) -> dict:
    return {"name": "s", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e8], "methods": {"edm": {}}} | changes


def refused_fields(error: ValidationError) -> set[str]:
    return {".".join(str(part) for part in item["loc"]) for item in error.errors()}


SPEC = """
name = "ladder"
dataset = "digits"
resolution = 8
seeds = [0]
budgets_flops = [3e8]

[defaults]
batch_size = 8
log_every = 1
ckpt_every = 100
label_dim = 10
eval = { at_fractions = [] }

[methods.ect]

[teacher]
train = true
budget_iters = 2

[models.w]
family = "edm2"
channels = [8, 16]
blocks = 1
channel_mult = [1, 2]
attn_levels = [1]
"""


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "ladder.toml"
    path.write_text(SPEC)
    return path


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


def test_unknown_dataset_and_missing_data_path_are_refused_when_planning(tmp_path):
    with pytest.raises(SpecError, match=r"  - dataset: Input should be 'digits', 'cifar10' or 'imagefolder'"):
        parse_spec(edm_spec(dataset="mnist"))
    with pytest.raises(SpecError, match=r"  - data_path: dataset 'cifar10' is read from disk"):
        parse_spec(edm_spec(dataset="cifar10", resolution=32))
    with pytest.raises(SpecError, match=r"  - data_path: .*nowhere does not exist"):
        parse_spec(edm_spec(dataset="cifar10", resolution=32, data_path=str(tmp_path / "nowhere")))
    with pytest.raises(ValidationError) as caught:
        RunConfig(method="edm", preset="xxs", budget_iters=1, dataset="cifar10")
    assert refused_fields(caught.value) == {"data_path"}


@pytest.mark.parametrize("field", ["presets", "seeds", "budgets_flops"])
def test_empty_grid_axes_are_refused_naming_the_field(tmp_path, field):
    with pytest.raises(SpecError, match=rf"{field}.* empty"):
        parse_spec(edm_spec(**{field: []}))
    with pytest.raises(SpecError, match=r"methods: no methods and no \[\[runs\]\]"):
        parse_spec(edm_spec(methods={}))


def test_a_spec_defined_ladder_plans_lists_and_trains(spec_file, tmp_path):
    runs = plan_sweep(load_spec(spec_file), tmp_path / "results")
    by_preset = {(run.config.method, run.config.preset): run for run in runs}
    assert set(by_preset) == {("edm", "w-c8"), ("edm", "w-c16"), ("ect", "w-c8"), ("ect", "w-c16")}
    student = by_preset["ect", "w-c16"].config
    assert student.architecture.family == "edm2" and student.architecture.channels == 16
    # the architecture is part of the run's identity
    assert student.identity()["architecture"]["channels"] == 16
    params = {name: count_parameters(meta_copy(lambda n=name: build_unet(
        by_preset["edm", n].config.network_preset(), 8, 1, label_dim=10))) for name in ("w-c8", "w-c16")}
    assert params["w-c8"] < params["w-c16"]
    listed = CliRunner().invoke(main, ["sweep", "plan", str(spec_file), "--root", str(tmp_path / "results")],
                                env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert f"{params['w-c16']:,}" in listed.output and "FLOPs/step" in listed.output
    # the teacher trains, its checkpoint carries the architecture, and the student starts from it
    teacher = by_preset["edm", "w-c16"].config
    assert train(teacher, tmp_path / "teacher")["status"] == "done"
    final = torch.load(tmp_path / "teacher" / "ckpt" / "final.pt", weights_only=True)
    assert final["model_spec"]["channels"] == 16
    from cmscale.teacher import load_denoiser

    denoiser = load_denoiser(tmp_path / "teacher" / "ckpt" / "final.pt")  # the public loader rebuilds it too
    assert denoiser.label_dim == 10 and denoiser(torch.zeros(2, 1, 8, 8), 1.0, torch.tensor([3, 4])).shape == (
        2, 1, 8, 8)
    student = student.model_copy(update={"teacher_ckpt": str(tmp_path / "teacher" / "ckpt" / "final.pt")})
    assert train(student, tmp_path / "student")["status"] == "done"
    resolved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert resolved["params"] == params["w-c16"]


def test_bad_spec_models_are_refused_naming_the_field(tmp_path):
    with pytest.raises(SpecError, match="models.xs: the name is a built-in preset"):
        parse_spec({"name": "x", "models": {"xs": {"family": "edm2", "channels": 8, "blocks": 1}},
                    "methods": {"edm": {}}, "budgets_flops": [1e9]})
    with pytest.raises(SpecError, match="family"):
        parse_spec({"name": "x", "models": {"w": {"family": "resnet", "channels": 8, "blocks": 1}},
                    "methods": {"edm": {}}, "budgets_flops": [1e9]})
    with pytest.raises(SpecError, match="unknown preset 'w2'"):
        parse_spec({"name": "x", "presets": ["w2"], "models": {"w": {"family": "edm2", "channels": 8, "blocks": 1}},
                    "methods": {"edm": {}}, "budgets_flops": [1e9]})
    with pytest.raises(ValueError, match="not divisible by 8"):
        RunConfig(method="edm", preset="w", resolution=12, budget_iters=1,
                  architecture={"family": "edm2", "channels": 8, "blocks": 1})
