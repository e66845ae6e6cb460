"""On the localhost SLURM cluster: the launcher asks the scheduler about its own job ids only.

Wrappers on PATH log each squeue/sacct command line and run the real one; a job that is not
the sweep's (another user's, as far as the sweep can tell) sits in the same queue.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cmscale.cluster.slurm import slurm_job_states

WRAPPER = '''#!PYTHON
import json, os, sys
with open(os.environ["SLURM_CALL_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
os.execv(REAL, [REAL, *sys.argv[1:]])
'''


def _sbatch(name: str) -> str:
    answer = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", "--output=/dev/null", "--mem=100M",
                             "--wrap", "sleep 60"], capture_output=True, text=True, timeout=60, check=True)
    return answer.stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_states_are_asked_by_the_sweeps_job_ids_and_a_foreign_job_is_never_listed(slurm_cluster, tmp_path,
                                                                                 monkeypatch):
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for name in ("squeue", "sacct"):
        real = shutil.which(name)
        assert real, f"{name} not installed"
        path = wrappers / name
        path.write_text(WRAPPER.replace("PYTHON", sys.executable).replace("REAL", repr(real)))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_CALL_LOG", str(log))
    ours, foreign = _sbatch("cmscale-ours"), _sbatch("someone-elses-job")
    try:
        states = slurm_job_states([ours])
        everything = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    finally:
        subprocess.run(["scancel", ours, foreign], capture_output=True, timeout=60)
    assert foreign in everything.split()  # the queue does hold the other job
    assert set(states) == {ours} and states[ours] in ("PENDING", "RUNNING")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    ours_calls = calls[:-1]  # the last one is the test's own unfiltered squeue
    assert ours_calls and all(call[call.index("-j") + 1] == ours for call in ours_calls), ours_calls
    # what the launcher's command line returns: our job only
    listed = subprocess.run(ours_calls[0], capture_output=True, text=True, timeout=30).stdout
    assert [line.split()[0] for line in listed.splitlines()] == [ours]
