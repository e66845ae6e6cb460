"""Sweep plans (cmscale.sweep.plan): deterministic planning, iso-FLOP iterations (ECT's as the trainer plans
them), example specs, and errors that name the field."""

import copy
import tomllib
from pathlib import Path

import pytest
from conftest import EXAMPLE

from cmscale.accounting import flops_per_step, iterations_for_budget
from cmscale.cluster.profiles import load_profile
from cmscale.sweep.plan import plan_sweep
from cmscale.sweep.spec import SpecError, parse_spec


def base_raw() -> dict:
    return tomllib.loads(EXAMPLE.read_text())


def plan(raw, tmp_path):
    return plan_sweep(parse_spec(raw, "spec.toml"), tmp_path, source="spec.toml")


def test_same_spec_plans_same_run_ids(tmp_path):
    first = [run.run_id for run in plan(base_raw(), tmp_path)]
    second = [run.run_id for run in plan(base_raw(), tmp_path / "elsewhere")]
    assert first == second
    assert len(first) == len(set(first)) == 2 + 2 * 2 * 2  # teachers + presets x budgets x methods


def test_changing_one_field_changes_exactly_the_affected_ids(tmp_path):
    before = {(r.config.method, r.config.preset, r.config.budget_flops): r.run_id for r in plan(base_raw(), tmp_path)}
    raw = base_raw()
    raw["methods"]["ect"]["ect"]["q"] = 4.0
    after = {(r.config.method, r.config.preset, r.config.budget_flops): r.run_id for r in plan(raw, tmp_path)}
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {key for key in before if key[0] == "ect"}


def test_changing_the_teacher_budget_changes_the_teachers_and_their_students(tmp_path):
    def key(run):  # a teacher is keyed without its budget, which is the field being changed
        return (run.config.method, run.config.preset, None if run.config.method == "edm" else run.config.budget_flops)

    before = {key(r): r.run_id for r in plan(base_raw(), tmp_path)}
    raw = base_raw()
    raw["teacher"]["budget_flops"] = 3e12
    after = {key(r): r.run_id for r in plan(raw, tmp_path)}
    assert before.keys() == after.keys()
    assert all(before[key] != after[key] for key in before)


def test_iterations_times_flops_per_step_match_the_budget_within_one_step(tmp_path):
    for run in plan(base_raw(), tmp_path):
        assert abs(run.iterations * run.flops_per_step - run.config.budget_flops) <= run.flops_per_step


def test_students_depend_on_their_teacher_and_point_at_its_checkpoint(tmp_path):
    runs = plan(base_raw(), tmp_path)
    teachers = {run.config.preset: run for run in runs if run.stage == 0}
    for run in runs:
        if run.stage == 1:
            teacher = teachers[run.config.preset]
            assert run.depends_on == [teacher.run_id]
            assert run.config.teacher_ckpt.startswith(str(tmp_path.resolve() / "digits_tiny" / teacher.run_id))


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda raw: raw["methods"].update({"cd_magic": {}}), "methods"),
        (lambda raw: raw.update({"presets": ["xs", "huge"]}), "presets"),
        (lambda raw: raw.update({"budgets_flops": [-1e12]}), "budgets_flops"),
        (lambda raw: raw.update({"budgets_flops": ["lots"]}), "budgets_flops.0"),
        (lambda raw: raw["teacher"].update({"train": False}), "teacher"),
        (lambda raw: raw["defaults"].update({"learning_rate": 1.0}), "defaults.learning_rate"),
        (lambda raw: raw["defaults"].update({"batch_size": 0}), "batch_size"),
        (lambda raw: raw["executor"].update({"name": "slurm", "profile": "no_such_cluster"}), "executor.profile"),
    ],
    ids=[
        "unknown-method",
        "unknown-preset",
        "negative-budget",
        "non-numeric-budget",
        "missing-teacher",
        "unknown-field",
        "bad-batch",
        "unknown-profile",
    ],
)
def test_spec_errors_name_the_file_and_field(tmp_path, mutate, field):
    raw = copy.deepcopy(base_raw())
    mutate(raw)
    with pytest.raises(SpecError) as info:
        plan(raw, tmp_path)
    message = str(info.value)
    assert "spec.toml" in message and field in message


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(Exception) as info:
        load_profile("no_such_cluster")
    assert "no_such_cluster" in str(info.value) and "local" in str(info.value)


def test_log_spaced_budgets_and_explicit_runs(tmp_path):
    raw = base_raw()
    del raw["budgets_flops"]
    raw["budgets"] = {"start": 1e12, "stop": 1e13, "num": 3}
    raw["runs"] = [{"method": "scd", "preset": "xs", "budget_flops": 5e12}]
    runs = plan(raw, tmp_path)
    budgets = sorted({r.config.budget_flops for r in runs if r.stage == 1 and r.config.method == "ect"})
    assert budgets == pytest.approx([1e12, 3.16228e12, 1e13], rel=1e-5)
    assert any(r.config.method == "scd" and r.config.budget_flops == 5e12 for r in runs)


def test_dry_run_submits_one_array_per_teacher_group(tmp_path):
    from cmscale.sweep.launch import submit_runs

    spec = parse_spec(base_raw(), "spec.toml")
    runs = plan_sweep(spec, tmp_path, source="spec.toml")
    report = submit_runs(runs, spec, tmp_path, "slurm", "local", dry_run=True)
    # Teachers in one array, then the students of each teacher in one array each.
    assert report.sbatch_calls == 1 + 2
    assert sorted(report.submitted) == sorted(run.run_id for run in runs)
    # Nothing recorded (no sweep.json, no job.json): only the sbatch scripts it would submit.
    assert [path.name for path in (tmp_path / "digits_tiny").iterdir()] == ["_dry_run"]
    assert sorted(Path(script).name for script in report.scripts) == [f"dryrun{i}.sbatch" for i in (1, 2, 3)]


# ----------------------------------------------------------------------------------------------
# run_id_for: the ids are the plan's identity across code versions


def test_run_id_for_is_pinned_for_known_configs():
    """Pinned ids: a change here renames every planned run on disk, so it must be deliberate. The
    restructure kept the old ids; they changed once since, on purpose, when issue 14 changed ECT's
    recipe defaults (shift 0.003 in eval mode only) and added sCM options to every run's identity."""
    from cmscale.config import RunConfig
    from cmscale.sweep.plan import run_id_for

    student = RunConfig(method="ect", preset="xs", budget_flops=2e12, seed=1, teacher_ckpt="/a/final.pt",
                        teacher_run_id="edm-xs-1e13F-s1-0123456789", sweep="s")
    teacher = RunConfig(method="edm", preset="xxs", budget_iters=50)
    assert run_id_for(student) == "ect-xs-2e12F-s1-1088939e6b"
    assert run_id_for(teacher) == "edm-xxs-50it-s0-251c55b301"


def test_run_id_for_follows_the_identity_and_ignores_bookkeeping_and_teacher_paths():
    from cmscale.config import RunConfig
    from cmscale.sweep.plan import run_id_for

    base = RunConfig(method="ect", preset="xs", budget_flops=2e12, teacher_ckpt="/a/final.pt", teacher_run_id="edm-t")
    same = [base.model_copy(update=update) for update in (
        {"sweep": "other"}, {"run_id": "given"}, {"device": "cuda"}, {"heartbeat_s": 1.0},
        {"teacher_ckpt": "/elsewhere/final.pt"},  # the teacher enters through its run id
    )]
    assert {run_id_for(config) for config in same} == {run_id_for(base)}
    changed = [base.model_copy(update=update) for update in (
        {"lr": 5e-4}, {"seed": 1}, {"batch_size": 32}, {"teacher_run_id": "edm-u"},
        {"ect": base.ect.model_copy(update={"q": 4.0})},
    )]
    ids = [run_id_for(config) for config in changed]
    assert len(set(ids)) == len(ids) and run_id_for(base) not in ids
    assert run_id_for(base).startswith("ect-xs-2e12F-s0-")
    # Options added later rename only the runs that set them: at their defaults the id is unchanged.
    assert run_id_for(base.model_copy(update={"lr_schedule": "constant", "lr_final_ratio": 0.1})) == run_id_for(base)
    decayed = {run_id_for(base.model_copy(update=update)) for update in (
        {"lr_schedule": "cosine"}, {"lr_schedule": "cosine", "lr_final_ratio": 0.0})}
    assert len(decayed) == 2 and run_id_for(base) not in decayed
    without_run_id = base.model_copy(update={"teacher_run_id": None})
    assert run_id_for(without_run_id) != run_id_for(without_run_id.model_copy(update={"teacher_ckpt": "/b.pt"}))


# ---------------------------------------------------------------------------------------------
# ECT's planned iterations, and the example specs


def test_the_sweep_planner_plans_ect_iterations_as_the_trainer_does(tmp_path, monkeypatch):
    from cmscale.sweep.plan import Planner
    from cmscale.sweep.spec import SweepSpec

    monkeypatch.setenv("CMSCALE_CACHE_DIR", str(tmp_path / "cache"))
    teacher = tmp_path / "t.pt"
    teacher.touch()  # planning checks that the checkpoint exists; it reads nothing from it
    spec = SweepSpec.model_validate(
        {
            "name": "ectplan",
            "dataset": "digits",
            "resolution": 16,
            "presets": ["xxs"],
            "seeds": [0],
            "budgets": {"start": 3e9, "stop": 3e10, "num": 3},
            "methods": {"ect": {}},
            "teacher": {"checkpoints": {"xxs": str(teacher)}},
        }
    )
    runs = [run for run in Planner(spec, tmp_path).plan() if run.config.method == "ect"]
    assert runs
    for run in runs:
        assert run.iterations == iterations_for_budget(run.config)
        assert run.flops_per_step == flops_per_step(run.config)


@pytest.mark.slow  # counts the FLOPs of the 280M-1.1B-parameter networks (about 20 s)
def test_the_imagenet64_example_plans_ect_and_scd_over_edm2s_ladder(tmp_path):
    from pathlib import Path

    from cmscale.sweep.plan import plan_sweep
    from cmscale.sweep.spec import load_spec

    teacher = tmp_path / "teacher.pt"
    teacher.touch()
    example = Path(__file__).resolve().parents[1] / "examples" / "sweep_imagenet64_edm2.toml"
    overrides = {"data_path": str(tmp_path), **{f"teacher.checkpoints.edm2-img64-{size}": str(teacher)
                                                 for size in ("s", "m", "l", "xl")}}
    runs = plan_sweep(load_spec(example, overrides), tmp_path / "results")
    ect = {run.config.preset: run.config for run in runs if run.config.method == "ect"}
    assert list(ect) == ["edm2-img64-s", "edm2-img64-m", "edm2-img64-l", "edm2-img64-xl"]
    assert [config.lr for config in ect.values()] == [1e-3, 9e-4, 8e-4, 7e-4]
    s = ect["edm2-img64-s"]
    assert (s.label_dim, s.ect.weighting, s.ect.q, s.ect.t_mid, s.lr_schedule, s.lr_ref_batches, s.dropout_res) == (
        1000, "snrpk", 4.0, 1.526, "inv_sqrt", 2000, 16)
    assert {run.config.preset for run in runs if run.config.method == "scd"} == {"edm2-img64-s", "edm2-img64-m"}
