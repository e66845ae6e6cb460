"""Watching runs on the localhost SLURM cluster: waiting for a state, reading sacct, and a thread that
records every state a run passes through."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from cmscale.rundir import read_json, read_metrics
from cmscale.sweep.status import sweep_states


def wait_until(predicate, timeout_s: float, poll_s: float = 0.25, what: str = "condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def state_of(root: Path, sweep_name: str, run_id: str) -> str:
    return next(state.state for state in sweep_states(root, sweep_name) if state.run_id == run_id)


def assert_steps_exactly_once(run_dir: Path) -> list[int]:
    """Every logged train step appears once, in order, ending at the run's resolved budget."""
    config = read_json(run_dir / "config.json")
    steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl", kind="train")]
    log_every, total = config["log_every"], config["budget_iters_resolved"]
    expected = sorted({*range(log_every, total + 1, log_every), total})
    assert steps == expected, f"{run_dir.name}: steps {steps} != {expected}"
    return steps


def sacct_states(job_ids: list[str], duplicates: bool = False) -> list[tuple[str, str]]:
    args = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)] + (["-D"] if duplicates else [])
    output = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout
    return [(line.split("|")[0], line.split("|")[1].split()[0]) for line in output.splitlines() if "|" in line]


class StatusWatcher(threading.Thread):
    """Records every distinct status.json a run writes (the last one overwrites the others)."""

    def __init__(self, run_dirs: list[Path]):
        super().__init__(daemon=True)
        self.run_dirs = run_dirs
        self.seen: dict[str, list[dict]] = {run_dir.name: [] for run_dir in run_dirs}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for run_dir in self.run_dirs:
                try:
                    status = read_json(run_dir / "status.json")
                except (OSError, ValueError):
                    continue
                history = self.seen[run_dir.name]
                if not history or history[-1] != status:
                    history.append(status)
            self.stop.wait(0.1)

    def resumed_from(self, run_id: str) -> list[int]:
        return [s["resumed_from"] for s in self.seen[run_id] if s.get("state") == "running" and s.get("resumed_from")]
