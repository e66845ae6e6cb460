"""The local executor (cmscale.cluster.launchers, sweep.status, sweep.launch): run states come from
the run's process and its status.json, `sweep cancel` signals only the process it launched (pid and
start time), and the launcher's training processes end with it. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from cmscale.rundir import (
    RunState,
    atomic_write_json,
    process_descendants,
    process_start_time,
    read_json,
    write_status,
)
from cmscale.sweep.launch import cancel_sweep
from cmscale.sweep.status import run_state

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"method": "edm", "preset": "xxs", "heartbeat_s": 1.0}


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def local_job(run_dir: Path, pid: int, start: int | None) -> None:
    atomic_write_json(run_dir / "job.json", {"executor": "local", "job_id": str(pid), "attempt": 1,
                                             "pid_start": start})


def test_a_started_local_run_is_running_not_queued(tmp_path):
    process = sleeper()
    try:
        run_dir = tmp_path / "sw" / "r0"
        local_job(run_dir, process.pid, process_start_time(process.pid))
        assert run_state("r0", run_dir, CONFIG, {}).state == RunState.RUNNING  # before status.json
        write_status(run_dir, RunState.RUNNING)
        assert run_state("r0", run_dir, CONFIG, {}).state == RunState.RUNNING
    finally:
        process.kill()
        process.wait()
    write_status(run_dir, RunState.INTERRUPTED, step=167, signal="SIGINT")
    os.utime(run_dir / "status.json", (time.time() - 60, time.time() - 60))
    state = run_state("r0", run_dir, CONFIG, {})
    assert state.state == RunState.LOST and "interrupted by SIGINT at step 167" in state.reason


def test_cancel_signals_only_the_process_the_launcher_started(tmp_path):
    ours, unrelated = sleeper(), sleeper()
    try:
        root = tmp_path
        runs = [{"run_id": f"r{i}", "config": CONFIG} for i in range(2)]
        atomic_write_json(root / "sw" / "sweep.json", {"sweep": "sw", "runs": runs})
        local_job(root / "sw" / "r0", ours.pid, process_start_time(ours.pid))
        # r1's job.json names the pid now held by an unrelated process, which started later than the job.
        local_job(root / "sw" / "r1", unrelated.pid, process_start_time(unrelated.pid) - 1)
        assert run_state("r1", root / "sw" / "r1", CONFIG, {}).state == RunState.LOST
        assert cancel_sweep(root, "sw") == [str(ours.pid)]
        assert ours.wait(timeout=10) == -signal.SIGTERM
        time.sleep(0.2)
        assert unrelated.poll() is None
    finally:
        for process in (ours, unrelated):
            process.kill()
            process.wait()


def test_sigint_to_the_local_launcher_ends_its_training_with_a_checkpoint(tmp_path):
    spec = {"name": "sig", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e15], "methods": {"edm": {}},
            "defaults": {"batch_size": 8, "log_every": 1, "ckpt_every": 100000, "heartbeat_s": 1.0,
                         "eval": {"at_fractions": []}},
            "executor": {"name": "local", "max_parallel": 1}}
    path = tmp_path / "sig.toml"
    path.write_text(tomli_w.dumps(spec))
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CMSCALE_NUM_THREADS": "1"}
    code = "from cmscale.cli.main import main; main()"
    launcher = subprocess.Popen([sys.executable, "-c", code, "sweep", "launch", str(path), "--root", str(root)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline:
            statuses = list(root.glob("sig/*/status.json"))
            if statuses:
                try:
                    status = read_json(statuses[0])
                except (OSError, ValueError):
                    status = None
                if status and status.get("state") == "running" and (status.get("step") or 0) >= 2:
                    break
            time.sleep(0.5)
        assert status and status.get("state") == "running", launcher.stdout.read() if launcher.poll() else status
        children = process_descendants(launcher.pid)
        assert children
        launcher.send_signal(signal.SIGINT)  # the launcher alone, not its process group
        launcher.wait(timeout=180)
        time.sleep(0.5)
        assert not [pid for pid in children if _alive(pid)]
        run_dir = statuses[0].parent
        assert read_json(run_dir / "status.json")["state"] == "interrupted"
        assert (run_dir / "ckpt" / "latest.pt").is_file()
        assert json.loads((run_dir / "job.json").read_text())["pid_start"] is not None
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
