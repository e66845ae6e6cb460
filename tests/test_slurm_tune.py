"""An Optuna search on the localhost SLURM cluster: two workers as one job array share the journal."""

from __future__ import annotations

import pytest
import tomli_w
from click.testing import CliRunner
from optuna.trial import TrialState

from cmscale.cli import main
from cmscale.rundir import read_json
from cmscale.tune.storage import read_tune_file, stored_spec
from cmscale.tune.study import load_study

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_two_array_workers_complete_a_four_trial_study_without_lost_or_duplicate_trials(
    slurm_cluster, tmp_path, teacher_ckpt
):
    root = tmp_path / "results"
    spec = {
        "name": "slurm4",
        "n_trials": 4,
        "workers": 2,
        "base": {
            "method": "ect",
            "preset": "xxs",
            "budget_iters": 16,
            "batch_size": 16,
            "teacher_ckpt": teacher_ckpt,
            "heartbeat_s": 1.0,
            "ckpt_every": 8,
            "log_every": 4,
            "eval": {"at_fractions": [1.0], "num_samples": 64, "batch_size": 64, "grid_images": 0, "cm_steps": [2]},
        },
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "objective": {"metrics": ["fid_2step"]},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "executor": {"name": "slurm", "profile": "local", "timeout_min": 15},
    }
    spec_path = tmp_path / "slurm4.toml"
    spec_path.write_text(tomli_w.dumps(spec))
    result = CliRunner().invoke(
        main, ["tune", "run", str(spec_path), "--root", str(root), "--executor", "slurm", "--wait"]
    )
    assert result.exit_code == 0, result.output

    jobs = read_tune_file(root, "slurm4")["jobs"]
    array_id = jobs[0].split("_")[0]
    assert sorted(jobs) == [f"{array_id}_0", f"{array_id}_1"]  # one array, two tasks

    study = load_study(stored_spec(root, "slurm4"), root)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    run_ids = [t.user_attrs["run_id"] for t in trials]
    assert len(set(run_ids)) == 4
    # Each run directory holds exactly one trial, and there are no others.
    assert sorted(p.name for p in (root / "slurm4").iterdir() if (p / "trial.json").is_file()) == sorted(run_ids)
    for trial in trials:
        record = read_json(root / "slurm4" / trial.user_attrs["run_id"] / "trial.json")
        assert (record["trial_number"], record["state"]) == (trial.number, "COMPLETE")
        assert read_json(root / "slurm4" / trial.user_attrs["run_id"] / "done.json")["status"] == "done"
    # Both array tasks pulled trials, and they ran at the same time on the one journal.
    workers = {t.user_attrs["worker_job_id"] for t in trials}
    assert workers == set(jobs)
    spans = [(t.datetime_start, t.datetime_complete, t.user_attrs["worker_job_id"]) for t in trials]
    assert any(a[2] != b[2] and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans)
