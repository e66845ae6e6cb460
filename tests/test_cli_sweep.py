"""`cmscale sweep` conventions: `status --watch` shows running runs' progress, failed runs make a
non-zero exit that names them, `--set` overrides the spec with clear errors, `--json` everywhere."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmscale.cli import main
from cmscale.rundir import DONE_FILE, JOB_FILE, SWEEP_FILE, atomic_write_json, touch_heartbeat, write_status

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep_digits_tiny.toml"


def cmscale(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def write_watched_sweep(root: Path) -> None:
    """A sweep of three runs as the trainer leaves them: one running (this process stands in for
    its local job), one done, one never submitted."""
    runs = [("running-run", "ect"), ("done-run", "ect"), ("planned-run", "scd")]
    atomic_write_json(root / "w" / SWEEP_FILE, {
        "sweep": "w", "spec_path": "", "runs": [
            {"run_id": run_id, "stage": 1, "depends_on": [], "iterations": 100, "flops_per_step": 1,
             "config": {"method": method, "preset": "xs", "heartbeat_s": 60.0}} for run_id, method in runs]})
    running = root / "w" / "running-run"
    atomic_write_json(running / JOB_FILE, {"executor": "local", "job_id": str(os.getpid())})
    write_status(running, "running", step=50, total_steps=100, images_per_s=123.4, loss=0.0421, eta_s=100.0)
    touch_heartbeat(running)
    atomic_write_json(root / "w" / "done-run" / JOB_FILE, {"executor": "local", "job_id": "1"})
    atomic_write_json(root / "w" / "done-run" / DONE_FILE, {"status": "done"})


def test_watch_shows_progress_and_eta_of_running_runs_and_the_counts(tmp_path):
    write_watched_sweep(tmp_path)
    result = cmscale("sweep", "status", "w", "--root", tmp_path, "--watch", "--interval", "0.1", "--refreshes", "2")
    assert result.exit_code == 0, result.output
    assert "sweep w: done 1, planned 1, running 1" in result.output
    assert "running-run" in result.output and "done-run" not in result.output.split("running")[-1]
    for shown in ("50/100", "123.4", "0.0421", "1:40"):  # step, images/s, loss, ETA (100 s)
        assert shown in result.output, result.output


def test_watch_as_json_streams_one_line_per_refresh(tmp_path):
    write_watched_sweep(tmp_path)
    result = cmscale("sweep", "status", "w", "--root", tmp_path, "--watch", "--interval", "0.1", "--refreshes", "3",
                     "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3
    (running,) = lines[-1]["running"]
    assert running["run_id"] == "running-run" and running["fraction"] == 0.5 and running["eta_s"] == 100.0
    assert lines[-1]["counts"] == {"done": 1, "planned": 1, "running": 1}
    assert time.time() - running["updated"] < 600


def test_watch_on_a_sweep_that_does_not_exist_names_the_sweeps_there(tmp_path):
    write_watched_sweep(tmp_path)
    result = cmscale("sweep", "status", "nope", "--root", tmp_path, "--watch")
    assert result.exit_code == 1
    assert "no sweep 'nope'" in result.output and "sweeps there: w" in result.output
    assert "Traceback" not in result.output


def test_status_json_carries_the_progress_of_running_runs(tmp_path):
    write_watched_sweep(tmp_path)
    result = cmscale("sweep", "status", "w", "--root", tmp_path, "--json")
    runs = {run["run_id"]: run for run in json.loads(result.stdout)["runs"]}
    assert runs["running-run"]["progress"]["step"] == 50 and runs["done-run"]["progress"] is None


@pytest.mark.parametrize(("override", "named"), [
    ("no_such_field=1", "no_such_field: Extra inputs are not permitted"),
    ("seeds=abc", "seeds: Input should be a valid list"),
    ("executor.max_parallel=many", "executor.max_parallel"),
    ("budgets_flops", "is not KEY=VALUE"),
])
def test_a_bad_set_names_the_option_and_the_fix(tmp_path, override, named):
    for command in (["sweep", "plan", EXAMPLE], ["sweep", "launch", EXAMPLE, "--dry-run"]):
        result = cmscale(*command, "--root", tmp_path, "--set", override)
        assert result.exit_code != 0
        assert named in result.output and "--set" in result.output, result.output
        assert "Traceback" not in result.output


def test_set_changes_the_plan(tmp_path):
    base = json.loads(cmscale("sweep", "plan", EXAMPLE, "--root", tmp_path, "--json").stdout)
    result = cmscale("sweep", "plan", EXAMPLE, "--root", tmp_path, "--json", "--set", 'presets=["xxs"]',
                     "--set", "defaults.batch_size=16")
    changed = json.loads(result.stdout)
    assert {run["preset"] for run in base} == {"xxs", "xs"} and {run["preset"] for run in changed} == {"xxs"}
    # a teacher's iteration count at a fixed FLOP budget doubles with half the batch
    teacher = next(run for run in base if run["method"] == "edm" and run["preset"] == "xxs")
    assert next(run for run in changed if run["method"] == "edm")["iterations"] in (
        2 * teacher["iterations"], 2 * teacher["iterations"] + 1)


def test_a_local_launch_with_a_failed_run_exits_1_and_names_it(tmp_path):
    """A teacher whose loss turns NaN fails; its students are skipped; the launch exits 1 naming them."""
    result = cmscale("sweep", "launch", EXAMPLE, "--root", tmp_path, "--executor", "debug", "--json",
                     "--set", 'presets=["xxs"]', "--set", "budgets_flops=[2e10]", "--set", 'methods={ect={}}',
                     "--set", "teacher.overrides.lr=1e30")
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    failed = {run["run_id"]: run for run in payload["failed"]}
    assert len(failed) == 2 and any(run_id.startswith("edm-") for run_id in failed)
    assert "did not finish" in result.stderr and all(run_id in result.stderr for run_id in failed)
    # relaunch re-plans from the spec as launched (with its --set, kept in sweep.json): the same
    # teacher fails again the same way, and relaunch says so with its exit code and JSON
    again = cmscale("sweep", "relaunch", "digits_tiny", "--root", tmp_path, "--failed", "--json")
    assert again.exit_code == 1, again.output
    payload = json.loads(again.stdout)
    assert payload["overrides"]["teacher.overrides.lr"] == 1e30
    assert payload["submitted"] == [run_id for run_id in failed if run_id.startswith("edm-")]
    assert {run["run_id"] for run in payload["failed"]} == set(failed)


def test_status_lists_running_runs_with_their_progress(tmp_path):
    write_watched_sweep(tmp_path)
    result = cmscale("sweep", "status", "w", "--root", tmp_path)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("running-run,")]
    assert rows == ["running-run,50%,50/100,123.4,0.0421,1:40,0:00 ago"]  # CSV into a pipe
