"""Signals that save work (cmscale.stopping): SIGINT and SIGUSR2 to a local `cmscale train` stop it at a
step boundary with a checkpoint and status "interrupted"; started again it resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmscale.rundir import read_json, read_metrics
from cmscale.stopping import STOP_CODES, StopSignals

CMSCALE = [sys.executable, "-m", "cmscale.cli"]
FIELDS = dict(method="edm", preset="xxs", dataset="digits", resolution=8, batch_size=8, budget_iters=60, dropout=0.1,
              ckpt_every=1000, log_every=1, ema_rates=[0.9], seed=5, eval={"at_fractions": []})


def run_toml(path: Path) -> Path:
    lines = [f"{key} = {value!r}".replace("'", '"') for key, value in FIELDS.items() if key != "eval"]
    path.write_text("\n".join(lines) + "\n\n[eval]\nat_fractions = []\n")
    return path


def env() -> dict[str, str]:
    keep = {key: value for key, value in os.environ.items() if not key.startswith(("RANK", "WORLD_SIZE", "SLURM_"))}
    return keep | {"CMSCALE_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def interrupt_after(toml: Path, run_dir: Path, rows: int, signum: int) -> subprocess.CompletedProcess:
    """Start `cmscale train`, send ``signum`` once ``rows`` train rows are on disk, and wait for it to end."""
    process = subprocess.Popen([*CMSCALE, "train", str(toml), "--out", str(run_dir)], env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while len(read_metrics(run_dir / "metrics.jsonl", "train")) < rows:
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_stop_codes_rank_a_requeue_over_a_termination_over_ctrl_c():
    assert STOP_CODES[None] < STOP_CODES["SIGINT"] < STOP_CODES["SIGTERM"] < STOP_CODES["SIGUSR2"]


def test_stop_signals_set_a_flag_restore_the_handlers_and_a_second_ctrl_c_aborts():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGUSR2, signal.SIGTERM)}
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested == "SIGUSR2" and stop.agreed(1, torch.device("cpu")) == "SIGUSR2"
        stop.requested = None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {signum: signal.getsignal(signum) for signum in before} == before


@pytest.mark.slow
def test_sigint_and_sigusr2_checkpoint_a_local_run_that_then_resumes_exactly(tmp_path):
    toml = run_toml(tmp_path / "run.toml")
    run_dir = tmp_path / "run"
    stopped_at = []
    for signum, rows in ((signal.SIGINT, 4), (signal.SIGUSR2, 20)):
        name = signal.Signals(signum).name
        result = interrupt_after(toml, run_dir, rows, signum)
        assert result.returncode == 128 + signum, result.stderr
        assert f"interrupted by {name} at step" in result.stderr and "run the same command again" in result.stderr
        status = read_json(run_dir / "status.json")
        assert status["state"] == "interrupted" and status["signal"] == name
        assert not (run_dir / "done.json").exists()
        # The checkpoint holds the step the run stopped at (ckpt_every is far beyond it).
        assert torch.load(run_dir / "ckpt" / "latest.pt", weights_only=True)["step"] == status["step"]
        stopped_at.append(status["step"])
    assert 4 <= stopped_at[0] < stopped_at[1] < FIELDS["budget_iters"]

    finished = subprocess.run([*CMSCALE, "train", str(toml), "--out", str(run_dir)], env=env(),
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    # The reference runs as the interrupted run does (a fresh `cmscale train`, one thread), not in this
    # process, whose thread count and state earlier tests may have changed.
    reference_dir = tmp_path / "uninterrupted"
    reference_run = subprocess.run([*CMSCALE, "train", str(toml), "--out", str(reference_dir)], env=env(),
                                   capture_output=True, text=True, timeout=300)
    assert reference_run.returncode == 0, reference_run.stderr

    def losses(folder: Path) -> list[tuple[int, float]]:
        return [(row["step"], row["loss"]) for row in read_metrics(folder / "metrics.jsonl", "train")]

    assert [step for step, _ in losses(run_dir)] == list(range(1, FIELDS["budget_iters"] + 1))
    assert losses(run_dir) == losses(reference_dir)  # bit-identical trajectory
    final = torch.load(run_dir / "ckpt" / "final.pt", weights_only=True)["net"]
    reference = torch.load(reference_dir / "ckpt" / "final.pt", weights_only=True)["net"]
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)
