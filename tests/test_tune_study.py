"""Tune studies (cmscale.tune.study, spec): a study name names one spec, the journal survives a
torn last line, grid values are validated with the rest of the space, a stale trial is failed and
retried, and a retried trial keeps its failed attempt. Real Optuna journals; no training (trials are
asked and told by hand)."""

from __future__ import annotations

import os
import time

import pytest
import tomli_w
from click.testing import CliRunner
from optuna.trial import TrialState
from run_folders import rows

from cmscale.cli import main
from cmscale.results import ingest
from cmscale.rundir import atomic_write_json, read_json
from cmscale.tune.spec import TuneSpecError, parse_tune_spec
from cmscale.tune.storage import TuneError, default_storage_path
from cmscale.tune.study import (
    best_run_config,
    claim_trial,
    create_study,
    fail_trial,
    open_search,
    study_summary,
    trial_run_id,
    write_trial_file,
)

BASE = {"method": "edm", "preset": "xxs", "budget_iters": 2}


def spec_of(name: str = "tt", budget_iters: int = 2, **extra):
    return parse_tune_spec({
        "name": name, "n_trials": 3, "base": BASE | {"budget_iters": budget_iters},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "objective": {"metrics": ["fid"]}, **extra,
    })


def run_one_trial(search, value: float) -> int:
    trial = claim_trial(search)
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    search.study.tell(trial, value)
    return trial.number


def test_a_study_name_reused_with_another_spec_is_refused_naming_both(tmp_path):
    root = tmp_path / "r"
    search = create_study(spec_of(budget_iters=2), root, spec_path="/specs/first.toml")
    number = run_one_trial(search, 1.0)
    config = spec_of(budget_iters=2).run_config(search.study.trials[0].params, sweep="tt", run_id="trial0000")
    atomic_write_json(root / "tt" / "trial0000" / "config.json", config.model_dump(mode="json") | {"params": 5})
    with pytest.raises(TuneError, match=r"(?s)/specs/second.toml.*'tt'.*/specs/first.toml.*--new-version"):
        create_study(spec_of(budget_iters=3), root, spec_path="/specs/second.toml")
    create_study(spec_of(budget_iters=2, n_trials=5), root, spec_path="/specs/first.toml")  # more trials: same study
    # A new version is accepted explicitly; the first trial still reports what it ran.
    create_study(spec_of(budget_iters=3), root, spec_path="/specs/second.toml", new_version=True)
    config, trial = best_run_config(root, "tt", trial_number=number)
    assert config["budget_iters"] == 2


def test_tune_run_refuses_another_spec_under_the_same_name(tmp_path):
    root = tmp_path / "r"
    create_study(spec_of(budget_iters=2), root, spec_path=str(tmp_path / "first.toml"))
    raw = {"name": "tt", "n_trials": 1, "base": BASE | {"budget_iters": 3}, "executor": {"name": "debug"},
           "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "objective": {"metrics": ["fid"]}}
    path = tmp_path / "second.toml"
    path.write_text(tomli_w.dumps(raw))
    result = CliRunner().invoke(main, ["tune", "run", str(path), "--root", str(root)])
    assert result.exit_code == 1 and "first.toml" in result.output and "second.toml" in result.output
    assert "Traceback" not in result.output


def test_a_torn_journal_line_is_cut_before_the_next_record_and_reads_say_so(tmp_path, caplog):
    root = tmp_path / "r"
    search = create_study(spec_of(), root)
    run_one_trial(search, 1.0)
    journal = default_storage_path(root, "tt")
    with open(journal, "ab") as handle:
        handle.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "par')  # a worker killed mid-write
    search = open_search(spec_of(), root)  # reads stop at the torn line
    assert "incomplete last line" in caplog.text
    run_one_trial(search, 0.5)  # the next record is not glued onto it
    summary = study_summary(root, "tt")
    assert summary["counts"] == {"COMPLETE": 2} and summary["best"][0]["values"] == [0.5]
    assert journal.read_bytes().endswith(b"\n") and b"par{" not in journal.read_bytes()


def test_a_damaged_journal_record_is_one_error_naming_the_file(tmp_path):
    root = tmp_path / "r"
    search = create_study(spec_of(), root)
    run_one_trial(search, 1.0)
    journal = default_storage_path(root, "tt")
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join(lines[:1] + [lines[1][:20] + lines[2]] + lines[3:]))  # two records glued
    result = CliRunner().invoke(main, ["tune", "status", "tt", "--root", str(root)])
    assert result.exit_code == 1 and str(journal) in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("grid", "message"), [([1e-3, 5.0], "space.lr.grid.1: 5.0 lies outside"),
                                                 ([-1.0], "space.lr.grid.0: -1.0 lies outside")])
def test_grid_values_are_validated_with_the_space(grid, message):
    raw = {"name": "g", "n_trials": 1, "base": BASE, "sampler": {"name": "grid"},
           "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "grid": grid}},
           "objective": {"metrics": ["fid"]}}
    with pytest.raises(TuneSpecError, match=message.replace(".", r"\.")):
        parse_tune_spec(raw, "g.toml")


def test_a_huge_int_grid_is_counted_not_built():
    raw = {"name": "g", "n_trials": 1, "base": BASE, "sampler": {"name": "grid"},
           "space": {"budget_iters": {"type": "int", "low": 1, "high": 10**15}}, "objective": {"metrics": ["fid"]}}
    assert parse_tune_spec(raw, "g.toml").sampler.name == "grid"


def test_a_retried_trial_keeps_its_failed_attempt_in_trial_json_and_in_the_trials_table(tmp_path):
    root = tmp_path / "root"
    spec = parse_tune_spec({"name": "retry", "n_trials": 1,
                            "base": {"method": "edm", "preset": "xxs", "budget_iters": 8},
                            "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                            "objective": {"metrics": ["fid"]}})
    search = create_study(spec, root)
    first = claim_trial(search)
    lr = first.suggest_float("lr", 1e-4, 1e-2, log=True)
    run_id = trial_run_id(search.frozen(first.number))
    run_dir = root / "retry" / run_id
    write_trial_file(run_dir, "retry", first.number, "RUNNING", {"lr": lr}, None, run_id)  # as run_trial does
    assert fail_trial(search, search.frozen(first.number), "worker died", retry=True)
    retry = claim_trial(search)
    assert retry.suggest_float("lr", 1e-4, 1e-2, log=True) == lr
    write_trial_file(run_dir, "retry", retry.number, "COMPLETE", {"lr": lr}, [12.5], run_id)

    record = read_json(run_dir / "trial.json")
    assert (record["trial_number"], record["state"], record["attempt"]) == (1, "COMPLETE", 2)
    [earlier] = record["earlier_attempts"]
    assert (earlier["trial_number"], earlier["state"], earlier["attempt"]) == (0, "FAIL", 1)
    assert earlier["reason"] == "worker died"
    ingest(root)
    assert rows(root, "SELECT trial_number, state, attempt, reason, run_id FROM trials ORDER BY trial_number") == [
        (0, "FAIL", 1, "worker died", run_id), (1, "COMPLETE", 2, None, run_id)]


def test_claim_fails_a_trial_with_a_stale_heartbeat_and_retries_it_in_the_same_run(tmp_path):
    """A worker on another node cannot be asked for its pid: a heartbeat older than zombie_after_s
    marks its trial FAIL, and the next claim gets the same params and run directory back."""
    root = tmp_path / "r"
    spec = parse_tune_spec({
        "name": "zombie", "n_trials": 1, "zombie_after_s": 0.5,
        "base": {"method": "edm", "preset": "xxs", "budget_iters": 8},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "objective": {"metrics": ["fid"]},
    })
    search = create_study(spec, root)
    first = claim_trial(search)
    lr = first.suggest_float("lr", 1e-4, 1e-2, log=True)
    first.set_user_attr("worker_host", "node-elsewhere")
    run_dir = root / "zombie" / "trial0000"
    run_dir.mkdir(parents=True)
    (run_dir / "heartbeat").touch()
    assert claim_trial(search) is None  # alive: the study's one trial is taken
    os.utime(run_dir / "heartbeat", (time.time() - 60, time.time() - 60))
    time.sleep(0.6)
    retry = claim_trial(search)
    assert retry is not None and retry.number == 1
    failed = search.study.get_trials()[0]
    assert failed.state == TrialState.FAIL and failed.user_attrs["retried"]
    assert "heartbeat" in failed.user_attrs["fail_reason"]
    assert retry.suggest_float("lr", 1e-4, 1e-2, log=True) == lr
    assert search.frozen(retry.number).user_attrs["run_id"] == "trial0000"
    assert read_json(run_dir / "trial.json")["state"] == "FAIL"
