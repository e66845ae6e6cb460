"""Shared test set-up: one torch thread per test process, the localhost SLURM cluster fixture, the
``cmscale sweep`` helpers of the sweep tests and the tiny EDM teacher of the search tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep_digits_tiny.toml"
# What every finished run leaves in its directory, whichever executor ran it.
RUN_FILES = {
    "config.json",
    "metrics.jsonl",
    "status.json",
    "heartbeat",
    "job.json",
    "done.json",
    "ckpt/latest.pt",
    "ckpt/final.pt",
}


# Tests use tiny networks: one thread is as fast and keeps results bitwise reproducible.
torch.set_num_threads(1)
os.environ.setdefault("CMSCALE_NUM_THREADS", "1")

START_HINT = "start it with `bash slurm/local/start.sh && source /tmp/cmscale-slurm/env.sh`"


def _cluster_problem() -> str | None:
    """Why the localhost SLURM cluster cannot be used, or None when it answers."""
    if not os.environ.get("SLURM_CONF"):
        return f"SLURM_CONF is not set; {START_HINT}"
    if shutil.which("sinfo") is None:
        return f"sinfo is not installed; {START_HINT}"
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 20 s; {START_HINT}"
    states = answer.stdout.split()
    if answer.returncode != 0 or not any(state.startswith(("idle", "mix", "alloc")) for state in states):
        return f"no usable node (sinfo: {answer.stdout.strip() or answer.stderr.strip()}); {START_HINT}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The localhost cluster's SLURM_CONF. Skips with the reason when it is not running, unless
    CMSCALE_REQUIRE_SLURM=1 (set by scripts/test.sh, so CI never skips these silently)."""
    problem = _cluster_problem()
    if problem:
        if os.environ.get("CMSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(f"the SLURM tests are required here but the cluster is unusable: {problem}")
        pytest.skip(problem)
    return os.environ["SLURM_CONF"]


def sweep(*args: str | Path) -> str:
    """Run ``cmscale sweep ARGS`` in process; fails the test with the output unless it exits 0."""
    from cmscale.cli.sweep import sweep_group

    result = CliRunner().invoke(sweep_group, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def submitted_count(output: str) -> int:
    """The N of "submitted N runs" in ``cmscale sweep launch``'s report."""
    match = re.search(r"submitted (\d+) runs", output)
    assert match, output
    return int(match.group(1))


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> str:
    """A tiny EDM teacher (10 iterations, no evals): ECT trials start from it."""
    from cmscale.config import RunConfig
    from cmscale.train import train

    run_dir = tmp_path_factory.mktemp("teacher") / "edm_xxs"
    config = RunConfig(method="edm", preset="xxs", budget_iters=10, batch_size=16, ckpt_every=1000,
                       eval={"at_fractions": []})
    assert train(config, run_dir)["status"] == "done"
    return str(run_dir / "ckpt" / "final.pt")
