"""Shared test set-up: one torch thread per test process, and the localhost SLURM cluster fixture."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

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
