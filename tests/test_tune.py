"""Optuna searches (cmscale tune) end to end: trial counts, pruning, resume after a kill.

Every trial is a real (tiny) ECT run on digits with real FID evals; the studies share one EDM
teacher trained once for the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import tomli_w
from click.testing import CliRunner
from optuna.trial import TrialState

from cmscale.cli import main
from cmscale.config import RunConfig, load_run_config
from cmscale.rundir import read_json
from cmscale.tune.spec import load_tune_spec
from cmscale.tune.storage import stored_spec
from cmscale.tune.study import load_study, open_search

REPO = Path(__file__).resolve().parents[1]


def ect_base(teacher_ckpt: str, at_fractions: list[float], cm_steps: list[int]) -> dict:
    return {
        "method": "ect",
        "preset": "xxs",
        "budget_iters": 16,
        "batch_size": 16,
        "teacher_ckpt": teacher_ckpt,
        "heartbeat_s": 1.0,
        "ckpt_every": 4,
        "log_every": 4,
        "eval": {
            "at_fractions": at_fractions,
            "num_samples": 64,
            "batch_size": 64,
            "grid_images": 0,
            "cm_steps": cm_steps,
        },
    }


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(tomli_w.dumps(spec))
    return path


def search_spec(name: str, teacher_ckpt: str, n_trials: int, workers: int) -> dict:
    return {
        "name": name, "n_trials": n_trials, "workers": workers, "zombie_after_s": 30.0,
        "base": ect_base(teacher_ckpt, [0.5, 1.0], [2]),
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                  "ect": {"q": {"type": "categorical", "choices": [2.0, 4.0]}}},
        "objective": {"metrics": ["fid_2step"]},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "executor": {"name": "local", "timeout_min": 10},
    }


def trials_by_state(study: optuna.Study) -> dict[str, list[optuna.trial.FrozenTrial]]:
    groups: dict[str, list] = {}
    for trial in study.get_trials(deepcopy=False):
        groups.setdefault(trial.state.name, []).append(trial)
    return groups


# ----------------------------------------------------------------------------------------------
# A 6-trial TPE search with 2 local workers


@pytest.fixture(scope="module")
def six_trial_study(tmp_path_factory, teacher_ckpt):
    root = tmp_path_factory.mktemp("tune_results")
    spec_path = write_spec(root.parent / "tune6.toml", search_spec("tpe6", teacher_ckpt, n_trials=6, workers=2))
    result = CliRunner().invoke(main, ["tune", "run", str(spec_path), "--root", str(root), "--executor", "local"])
    assert result.exit_code == 0, result.output
    return root, result.output


@pytest.mark.slow
def test_six_trial_search_with_two_local_workers_has_six_complete_trials(six_trial_study):
    root, output = six_trial_study
    study = load_study(stored_spec(root, "tpe6"), root)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    assert sorted(t.number for t in trials) == list(range(6))
    run_ids = {t.user_attrs["run_id"] for t in trials}
    assert len(run_ids) == 6
    # Two workers (two processes) shared the journal, and never proposed the same parameters.
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2
    assert len({t.params["lr"] for t in trials}) == 6
    for trial in trials:
        record = read_json(root / "tpe6" / trial.user_attrs["run_id"] / "trial.json")
        assert record["state"] == "COMPLETE" and record["trial_number"] == trial.number
        assert record["values"] == pytest.approx(trial.values)
        assert record["params"] == trial.params
    assert "6/6 trials used" in output


@pytest.mark.slow
def test_ingest_fills_trials_table_joined_to_runs(six_trial_study):
    from cmscale.results import ingest, query

    root, _ = six_trial_study
    ingest(root)
    joined = query(
        "SELECT t.trial_number, t.state, t.run_id, r.status, r.method FROM trials t "
        "JOIN runs r ON r.sweep = t.study AND r.run_id = t.run_id "
        "WHERE t.study = 'tpe6' ORDER BY t.trial_number", root=root, ingest_first=False)
    assert joined.height == 6
    assert joined["trial_number"].to_list() == list(range(6))
    assert set(joined["state"].to_list()) == {"COMPLETE"}
    assert set(joined["status"].to_list()) == {"done"} and set(joined["method"].to_list()) == {"ect"}


@pytest.mark.slow
def test_status_and_best_write_a_run_config_of_the_best_trial(six_trial_study, tmp_path):
    root, _ = six_trial_study
    runner = CliRunner()
    status = runner.invoke(main, ["tune", "status", "tpe6", "--root", str(root), "--json"])
    assert status.exit_code == 0, status.output
    summary = json.loads(status.output)
    assert summary["counts"] == {"COMPLETE": 6}
    study = load_study(stored_spec(root, "tpe6"), root)
    assert summary["best"][0]["number"] == study.best_trial.number
    assert summary["best"][0]["values"][0] == min(t.values[0] for t in study.get_trials())

    out = tmp_path / "best.toml"
    best = runner.invoke(main, ["tune", "best", "tpe6", "--root", str(root), "--write", str(out)])
    assert best.exit_code == 0, best.output
    config = load_run_config(out)
    assert config.lr == pytest.approx(study.best_trial.params["lr"])
    assert config.ect.q == study.best_trial.params["ect.q"]
    trial_config = read_json(root / "tpe6" / study.best_trial.user_attrs["run_id"] / "config.json")
    assert config.identity() == RunConfig.model_validate(
        {k: v for k, v in trial_config.items() if k in RunConfig.model_fields}).identity()


# ----------------------------------------------------------------------------------------------
# Pruning


@pytest.mark.slow
def test_median_pruner_stops_a_trial_in_a_bad_region_before_its_budget(tmp_path, teacher_ckpt):
    """ect.sigma_max only sets the one-step sampler's starting noise. At 0.002 the sampler returns
    (nearly) its own input, blank grey images, whose FID is far worse than at 0.5 or 1.0 for the
    same weights. Two good trials run first (enqueued), so the median pruner has its reference."""
    spec = {
        "name": "prune", "n_trials": 3, "workers": 1,
        "base": ect_base(teacher_ckpt, [0.25, 1.0], [1]),
        "space": {"ect": {"sigma_max": {"type": "float", "low": 1e-3, "high": 80.0, "log": True}}},
        "enqueue": [{"ect.sigma_max": 0.5}, {"ect.sigma_max": 1.0}, {"ect.sigma_max": 0.002}],
        "objective": {"metrics": ["fid_1step"]},
        "pruner": {"name": "median", "n_startup_trials": 2},
    }
    spec_path = write_spec(tmp_path / "prune.toml", spec)
    result = CliRunner().invoke(
        main, ["tune", "run", str(spec_path), "--root", str(tmp_path / "r"), "--executor", "debug"]
    )
    assert result.exit_code == 0, result.output
    study = load_study(stored_spec(tmp_path / "r", "prune"), tmp_path / "r")
    states = {t.params["ect.sigma_max"]: t.state for t in study.get_trials()}
    assert states == {0.5: TrialState.COMPLETE, 1.0: TrialState.COMPLETE, 0.002: TrialState.PRUNED}
    pruned = next(t for t in study.get_trials() if t.state == TrialState.PRUNED)
    run_dir = tmp_path / "r" / "prune" / pruned.user_attrs["run_id"]
    done = read_json(run_dir / "done.json")
    assert done["status"] == "pruned"
    assert done["final_step"] == 4 < read_json(run_dir / "config.json")["budget_iters_resolved"] == 16
    assert read_json(run_dir / "trial.json")["state"] == "PRUNED"
    # The pruned trial's intermediate FID (at 250/1000 of the budget) is worse than both good ones.
    good = [t.intermediate_values[250] for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert pruned.intermediate_values[250] > max(good)


@pytest.mark.slow
def test_multi_objective_search_gives_fid_and_nfe_and_says_pruning_is_off(tmp_path, teacher_ckpt):
    spec = {
        "name": "pareto",
        "n_trials": 2,
        "base": ect_base(teacher_ckpt, [0.5, 1.0], [1, 2]) | {"budget_iters": 8},
        "space": {"sampler_steps": {"type": "categorical", "choices": [1, 2]}},
        "objective": {"metrics": ["fid", "nfe"]},
        "pruner": {"name": "median"},
        "sampler": {"name": "random", "seed": 1},
    }
    spec_path = write_spec(tmp_path / "pareto.toml", spec)
    assert not load_tune_spec(spec_path).pruning
    result = CliRunner().invoke(
        main, ["tune", "run", str(spec_path), "--root", str(tmp_path / "r"), "--executor", "debug"]
    )
    assert result.exit_code == 0, result.output
    assert "pruning is off" in " ".join(result.output.split())
    study = load_study(stored_spec(tmp_path / "r", "pareto"), tmp_path / "r")
    for trial in study.get_trials():
        assert trial.state == TrialState.COMPLETE
        steps = trial.params["sampler_steps"]
        rows = [
            json.loads(line)
            for line in (tmp_path / "r" / "pareto" / trial.user_attrs["run_id"] / "metrics.jsonl").open()
        ]
        final = next(r for r in rows if r["kind"] == "eval" and r["step"] == 8 and r["sampler_steps"] == steps)
        assert trial.values == [pytest.approx(final["fid"]), steps]  # ECT: one network call per step
        assert trial.intermediate_values == {}  # nothing is reported to a study that cannot prune
    assert "Pareto front" in result.output


# ----------------------------------------------------------------------------------------------
# Resume after the tune process is killed


def _cmscale(log: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "CMSCALE_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "cmscale.cli", *args], cwd=REPO, env=env,
                                stdout=handle, stderr=subprocess.STDOUT, **kwargs)


@pytest.mark.slow
def test_killed_search_resumes_the_same_study_and_ends_with_exactly_n_trials(tmp_path, teacher_ckpt):
    root = tmp_path / "r"
    spec_path = write_spec(tmp_path / "resume.toml", search_spec("resume", teacher_ckpt, n_trials=3, workers=2))
    args = ("tune", "run", str(spec_path), "--root", str(root), "--executor", "local")
    first = _cmscale(tmp_path / "first.log", *args, start_new_session=True)
    journal = root / "resume" / "optuna.journal"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill once a trial has finished and another is running
            if journal.exists():
                groups = trials_by_state(load_study(stored_spec(root, "resume"), root))
                running = groups.get("RUNNING", [])
                # a trial is asked for before its worker records its run_id: wait until each claim is whole
                if groups.get("COMPLETE") and running and all("run_id" in t.user_attrs for t in running):
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the first tune process never had a complete and a running trial")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the tune process and its workers, as in a crash
        first.wait()
    before = trials_by_state(load_study(stored_spec(root, "resume"), root))
    killed = [t.user_attrs["run_id"] for t in before["RUNNING"]]

    second = _cmscale(tmp_path / "second.log", *args)
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()

    search = open_search(stored_spec(root, "resume"), root)
    assert optuna.get_all_study_names(search.storage) == ["resume"]
    groups = trials_by_state(search.study)
    assert len(groups["COMPLETE"]) + len(groups.get("PRUNED", [])) == 3
    assert set(groups) <= {"COMPLETE", "PRUNED", "FAIL"}  # nothing left RUNNING or WAITING
    # Trials complete before the kill were not redone; each killed one failed once and was
    # retried with the same parameters in the same run directory.
    assert {t.number for t in before["COMPLETE"]} <= {t.number for t in groups["COMPLETE"]}
    assert sorted(t.user_attrs["run_id"] for t in groups["FAIL"]) == sorted(killed)
    assert all(t.user_attrs["retried"] and t.user_attrs["fail_reason"].startswith("zombie") for t in groups["FAIL"])
    complete_runs = [t.user_attrs["run_id"] for t in groups["COMPLETE"]]
    assert len(set(complete_runs)) == 3 and set(killed) <= set(complete_runs)
    for trial in groups["COMPLETE"]:
        assert read_json(root / "resume" / trial.user_attrs["run_id"] / "trial.json")["trial_number"] == trial.number
