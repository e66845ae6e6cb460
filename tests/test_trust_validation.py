"""Bad input at the edge (issue 13, items 3 and 8-13): each refused with the field named, nothing written.

Every test here failed on the code before the fix: the inputs were accepted (and wrote outside the
results root, planned runs that could never start, clamped budgets in silence) or ended in a raw
traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import tomli_w
from click.testing import CliRunner
from pydantic import ValidationError

from cmscale.accounting import BudgetError, iterations_for_budget
from cmscale.cli import main
from cmscale.cluster.jobs import TrainJob
from cmscale.cluster.profiles import load_profile
from cmscale.config import RunConfig, safe_path_component
from cmscale.methods import TeacherCheckpointError, build_method
from cmscale.rundir import read_json
from cmscale.sweep.plan import plan_sweep
from cmscale.sweep.spec import SpecError, parse_spec
from cmscale.sweep.status import run_state
from cmscale.tune.spec import TuneSpecError, parse_tune_spec

TINY_FLOPS = 1_000_000  # a stand-in FLOP counter: planning here needs no traced step


def tiny_flops(config: RunConfig) -> int:
    return TINY_FLOPS


def edm_spec(**changes) -> dict:
    return {"name": "s", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e8], "methods": {"edm": {}}} | changes


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def refused_fields(error: ValidationError) -> set[str]:
    return {".".join(str(part) for part in item["loc"]) for item in error.errors()}


# -- item 3: every name that becomes a folder is one safe component ---------------------------------------------

HOSTILE_NAMES = ["../escape", "/tmp/abs", "..", ".", "a/b", ".hidden", "", "x\x00y", "a b", "é"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_unsafe_sweep_and_run_ids_are_refused_naming_the_field(name):
    for field in ("sweep", "run_id", "teacher_run_id"):
        with pytest.raises(ValidationError) as caught:
            RunConfig(method="edm", preset="xxs", budget_iters=1, **{field: name})
        assert refused_fields(caught.value) == {field}
    with pytest.raises(SpecError, match=r"  - name: .*not a safe folder name"):
        parse_spec(edm_spec(name=name))


@pytest.mark.parametrize("name", ["../escape", "..", "."])
def test_train_cli_writes_nothing_outside_the_root(tmp_path, name):
    toml = tmp_path / "run.toml"
    toml.write_text(tomli_w.dumps({"method": "edm", "preset": "xxs", "budget_iters": 1, "sweep": name}))
    root = tmp_path / "deep" / "root"
    result = CliRunner().invoke(main, ["train", str(toml), "--root", str(root)])
    assert result.exit_code == 1 and "sweep" in result.output and "not a safe folder name" in result.output
    assert files_under(tmp_path) == ["run.toml"]
    toml.write_text(tomli_w.dumps({"method": "edm", "preset": "xxs", "budget_iters": 1, "run_id": "../../x"}))
    result = CliRunner().invoke(main, ["train", str(toml), "--root", str(root)])
    assert result.exit_code == 1 and "run_id" in result.output
    assert files_under(tmp_path) == ["run.toml"]


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


# -- item 8: resolution bounded per dataset ---------------------------------------------------------------------


def test_resolution_above_the_dataset_bound_is_refused_with_the_bound():
    with pytest.raises(ValidationError) as caught:
        RunConfig(method="edm", preset="xxs", budget_iters=1, resolution=1024)
    assert refused_fields(caught.value) == {"resolution"} and "bound for dataset 'digits' (64)" in str(caught.value)
    with pytest.raises(SpecError, match=r"  - resolution: .*bound for dataset 'digits'"):
        parse_spec(edm_spec(resolution=1024))


# -- item 9: dataset a closed list; data_path required and existing, at plan and at run start ---------------------


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


def test_a_job_dying_at_start_up_records_the_exception_for_sweep_status(tmp_path):
    empty = tmp_path / "cifar"
    empty.mkdir()  # exists when planned, but holds no batches when the job starts
    config = RunConfig(method="edm", preset="xxs", budget_iters=1, dataset="cifar10", data_path=str(empty),
                       resolution=32)
    run_dir = tmp_path / "root" / "s" / "r1"
    with pytest.raises(FileNotFoundError):
        TrainJob()(config.model_dump(mode="json"), str(run_dir))
    done = read_json(run_dir / "done.json")
    assert done["status"] == "failed" and done["phase"] == "start-up"
    assert "DatasetNotFoundError" in done["reason"] and "data_batch_1" in done["reason"]
    state = run_state("r1", run_dir, config.model_dump(mode="json"), {})
    assert state.state == "failed" and "data_batch_1" in state.reason


# -- item 10: NaN and inf refused on every float field; EMA rates in [0, 1) ----------------------------------------


@pytest.mark.parametrize("field,value", [("budget_flops", math.inf), ("lr", math.inf), ("lr", math.nan),
                                         ("heartbeat_s", math.inf), ("ema_rates", [1.5]), ("ema_rates", [1.0]),
                                         ("adam_betas", [0.9, 1.0]), ("ema_rates", [math.nan]),
                                         ("ema_sigma_rels", [0.3]), ("ema_sigma_rels", [0.0]),
                                         ("ema_sigma_rels", [math.nan])])
def test_non_finite_and_out_of_range_floats_are_refused(field, value):
    fields = {"method": "edm", "preset": "xxs", "budget_iters": 1}
    if field == "budget_flops":
        fields.pop("budget_iters")
    with pytest.raises(ValidationError) as caught:
        RunConfig(**fields, **{field: value})
    assert {path.split(".")[0] for path in refused_fields(caught.value)} == {field}


def test_inf_budget_on_the_command_line_is_a_clean_error(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "edm"\npreset = "xxs"\nbudget_flops = inf\n')
    result = CliRunner().invoke(main, ["train", str(toml), "--root", str(tmp_path / "r")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1  # a ClickException, not OverflowError
    assert "budget_flops" in result.output and "finite" in result.output
    assert not (tmp_path / "r").exists()


# -- item 11: a budget below one step is refused with the step's FLOPs ----------------------------------------------


def test_budget_below_one_step_is_refused_with_the_step_flops(tmp_path):
    spec = parse_spec(edm_spec(budgets_flops=[1e3]))
    with pytest.raises(SpecError, match=r"budget_flops = 1000 is below one training step \(1e\+06 FLOPs per step"):
        plan_sweep(spec, tmp_path, flops_fn=tiny_flops)
    with pytest.raises(BudgetError, match="below one training step"):
        iterations_for_budget(RunConfig(method="edm", preset="xxs", budget_flops=1e3))


# -- item 12: an empty grid axis is refused by name --------------------------------------------------------------


@pytest.mark.parametrize("field", ["presets", "seeds", "budgets_flops"])
def test_empty_grid_axes_are_refused_naming_the_field(tmp_path, field):
    with pytest.raises(SpecError, match=rf"{field}.* empty"):
        parse_spec(edm_spec(**{field: []}))
    with pytest.raises(SpecError, match=r"methods: no methods and no \[\[runs\]\]"):
        parse_spec(edm_spec(methods={}))


# -- item 13: clear errors instead of tracebacks -------------------------------------------------------------------


def test_resolution_not_divisible_by_the_downsampling_is_refused():
    with pytest.raises(ValidationError) as caught:
        RunConfig(method="edm", preset="xxs", budget_iters=1, resolution=18)
    assert refused_fields(caught.value) == {"resolution"}
    assert "not divisible by 4, the downsampling of preset 'xxs'" in str(caught.value)


def test_an_unreadable_teacher_is_named_not_a_traceback(tmp_path):
    garbage = tmp_path / "teacher.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    config = RunConfig(method="ect", preset="xxs", budget_iters=1, teacher_ckpt=str(garbage))
    with pytest.raises(TeacherCheckpointError, match=rf"teacher checkpoint {garbage} cannot be read"):
        build_method(config, img_channels=1)


def test_csv_output_encodes_nested_columns_as_json(tmp_path):
    sql = "SELECT 'a' AS run, [1, 2] AS steps, {'k': 1.5} AS meta UNION ALL SELECT 'b', NULL, {'k': NULL}"
    result = CliRunner().invoke(main, ["results", "query", sql, "--root", str(tmp_path), "--format", "csv"])
    assert result.exit_code == 0, result.output
    back = pl.read_csv(result.stdout.encode()).sort("run")
    assert back.columns == ["run", "steps", "meta"]
    assert [json.loads(v) if v else None for v in back["steps"]] == [[1, 2], None]
    assert [json.loads(v) for v in back["meta"]] == [{"k": 1.5}, {"k": None}]
