"""The local executor runs the example sweep with the same results structure as SLURM: the planned
run ids, every run done with the same files, teachers before students, and a second launch
submitting nothing. (tests/test_slurm_sweep.py checks the same on the localhost cluster.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import EXAMPLE, RUN_FILES, submitted_count, sweep

from cmscale.rundir import read_job, read_json, read_metrics
from cmscale.sweep.plan import plan_sweep, read_sweep_file
from cmscale.sweep.spec import load_spec
from cmscale.sweep.status import sweep_states

pytestmark = pytest.mark.slow  # end to end: minutes of training on a busy machine



@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_sweep")
    spec = shutil.copy(EXAMPLE, root / "sweep_digits_tiny.toml")
    output = sweep("launch", spec, "--root", root, "--executor", "local")
    return root, Path(spec), output


def test_every_planned_run_is_done_with_the_run_directory_files(local_sweep):
    root, spec, output = local_sweep
    assert submitted_count(output) == 10
    planned = [run.run_id for run in plan_sweep(load_spec(spec), root, source=str(spec))]
    assert [run["run_id"] for run in read_sweep_file(root, "digits_tiny")["runs"]] == planned
    assert {state.run_id: state.state for state in sweep_states(root, "digits_tiny")} == dict.fromkeys(planned, "done")
    for run_id in planned:
        run_dir = root / "digits_tiny" / run_id
        present = {str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()}
        assert RUN_FILES <= present, f"{run_id} lacks {sorted(RUN_FILES - present)}"
        assert read_job(run_dir)["executor"] == "local"
        config = read_json(run_dir / "config.json")
        steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl", kind="train")]
        total = config["budget_iters_resolved"]
        assert steps == sorted({*range(config["log_every"], total + 1, config["log_every"]), total})
        evals = read_metrics(run_dir / "metrics.jsonl", kind="eval")
        assert sorted(row["sampler_steps"] for row in evals) == ([18] if config["method"] == "edm" else [1, 2])


def test_teachers_finish_before_their_students_start(local_sweep):
    root, _, _ = local_sweep
    runs = read_sweep_file(root, "digits_tiny")["runs"]
    base = root / "digits_tiny"
    for student in (run for run in runs if run["stage"] == 1):
        (teacher,) = student["depends_on"]
        assert (
            read_json(base / teacher / "done.json")["finished"]
            <= read_json(base / student["run_id"] / "done.json")["started"]
        )


def test_launching_again_submits_nothing(local_sweep):
    root, spec, _ = local_sweep
    assert submitted_count(sweep("launch", spec, "--root", root, "--executor", "local")) == 0
