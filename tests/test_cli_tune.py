"""`cmscale tune` (cmscale.cli.tune): bad options named, a dead worker named in one line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmscale.cli import main

TUNE_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tune_digits.toml"


def cmscale(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_tune_run_set_with_a_bad_key_names_the_option(tmp_path):
    result = cmscale("tune", "run", TUNE_EXAMPLE, "--root", tmp_path, "--set", "no_such_field=1")
    assert result.exit_code == 1
    assert "no_such_field" in result.output and "--set" in result.output and "Traceback" not in result.output


def test_a_dead_workers_error_is_one_line_that_says_what_happened():
    from cmscale.cli.tune import _worker_error

    killed = RuntimeError("Job 7 (task: 0) with path /r/7_0_result.pkl\nhas not produced any output (state: FAILED)\n"
                          "Error stream produced:\n----\nstep 90/2000  loss 7.3")
    assert _worker_error(killed) == ("Job 7 (task: 0) with path /r/7_0_result.pkl has not produced any output "
                                     "(state: FAILED)")
    raised = RuntimeError("Job (task=0) failed during processing with trace:\n----\nTraceback (most recent call "
                          "last):\n  File \"w.py\", line 1\nValueError: the journal is gone")
    assert _worker_error(raised) == "ValueError: the journal is gone"


@pytest.mark.slow
def test_tune_run_exits_1_and_names_a_worker_that_died(tmp_path, teacher_ckpt):
    """A local worker killed mid-trial (as the OOM killer would): `tune run` exits 1 naming it."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "r"
    command = [sys.executable, "-c", "from cmscale.cli import main; main()", "tune", "run", str(TUNE_EXAMPLE),
               "--root", str(root), "--executor", "local", "--workers", "1", "--json", "--set", "n_trials=1",
               "--set", "base.budget_iters=100000", "--set", f'base.teacher_ckpt="{teacher_ckpt}"']
    tune = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.time() + 300
        worker = None
        while worker is None and time.time() < deadline and tune.poll() is None:
            time.sleep(1)
            try:
                job = json.loads((root / "digits_ect_tune" / "tune.json").read_text())["jobs"][0]
                children = Path(f"/proc/{job}/task/{job}/children").read_text().split()
                worker = int(children[0]) if children else None
            except (OSError, KeyError, IndexError, ValueError):
                continue
        assert worker is not None, tune.communicate(timeout=60)
        time.sleep(3)
        os.kill(worker, signal.SIGKILL)
        out, err = tune.communicate(timeout=300)
    finally:
        if tune.poll() is None:
            tune.kill()
    assert tune.returncode == 1, err
    payload = json.loads(out)
    (dead,) = payload["dead_workers"]
    assert "has not produced any output" in dead["error"]
    assert f"worker {dead['job_id']} died" in " ".join(err.split()) and "1 of 1 worker(s) died" in err
