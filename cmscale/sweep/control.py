"""Sweep control: launch (idempotent), relaunch failed runs, cancel, and follow until done."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cmscale.rundir import DONE_FILE
from cmscale.sweep.launch import (
    LaunchReport,
    LocalLauncher,
    SlurmLauncher,
    read_job,
    write_sweep_file,
)
from cmscale.sweep.plan import PlannedRun
from cmscale.sweep.profiles import load_profile
from cmscale.sweep.spec import SweepSpec, check_profile
from cmscale.sweep.status import RunState, sweep_states

TERMINAL_STATES = {"done", "failed", "lost"}


def _select(runs: list[PlannedRun], states: dict[str, RunState], wanted: set[str], report: LaunchReport) -> tuple[list[PlannedRun], dict[str, str], set[str]]:
    """Runs to submit, live teacher job ids (for dependencies) and the ids already done."""
    live_jobs: dict[str, str] = {}
    done: set[str] = set()
    chosen: list[PlannedRun] = []
    for run in runs:
        state = states[run.run_id]
        if state.state == "done":
            done.add(run.run_id)
            report.skipped[run.run_id] = "done"
        elif state.state in ("queued", "running"):
            live_jobs[run.run_id] = state.job_id or ""
            report.skipped[run.run_id] = f"{state.state} as job {state.job_id}"
        elif state.state in wanted and state.ending:
            report.skipped[run.run_id] = f"its job {state.job_id} is still being killed; relaunch again in a few seconds"
        elif state.state in wanted:
            chosen.append(run)
        else:
            report.skipped[run.run_id] = state.state
    chosen_ids = {run.run_id for run in chosen}
    ready = []
    for run in chosen:
        blocked = [dep for dep in run.depends_on if dep not in done and dep not in live_jobs and dep not in chosen_ids]
        if blocked:
            report.skipped[run.run_id] = f"teacher {blocked[0]} is not done, queued or being submitted; relaunch it first"
        else:
            ready.append(run)
    return ready, live_jobs, done


def _archive_done_file(run_dir: Path) -> None:
    """A relaunched run starts a new attempt; keep the old verdict beside it for the record."""
    done_path = run_dir / DONE_FILE
    if done_path.is_file():
        done_path.rename(run_dir / f"done.attempt{int(time.time())}.json")


def submit_runs(
    runs: list[PlannedRun],
    spec: SweepSpec,
    root: Path,
    executor: str,
    profile_name: str | None,
    dry_run: bool = False,
    wanted: frozenset[str] = frozenset({"planned"}),
    on_finish: Callable[[PlannedRun, str], None] | None = None,
    spec_path: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LaunchReport:
    root = Path(root)
    report = LaunchReport()
    if not dry_run:
        write_sweep_file(root, spec.name, runs, spec_path=str(Path(spec_path).resolve()) if spec_path else "",
                         executor=executor, profile=(profile_name or spec.executor.profile) if executor == "slurm" else None)
        states = {state.run_id: state for state in sweep_states(root, spec.name)}
    else:
        states = {run.run_id: RunState(run.run_id, "planned", run.config.method, run.config.preset) for run in runs}
    ready, live_jobs, done = _select(runs, states, set(wanted), report)
    if not dry_run:
        for run in ready:
            _archive_done_file(run.run_dir(root))
    if not ready:
        return report
    if executor == "slurm":
        if profile_name:
            check_profile(profile_name, "--profile")
        else:
            check_profile(spec.executor.profile, f"{spec_path or '<spec>'}: invalid configuration\n  - executor.profile")
        profile = load_profile(profile_name or spec.executor.profile)
        SlurmLauncher(root, spec.name, profile, dry_run=dry_run, on_progress=on_progress).launch(ready, report, live_jobs)
    elif dry_run:
        report.submitted += [run.run_id for run in ready]
    else:
        launcher = LocalLauncher(root, spec.name, spec.executor.max_parallel, spec.executor.timeout_min, debug=executor == "debug", on_finish=on_finish)
        launcher.launch(ready, report, done)
    return report


def cancel_sweep(root: Path, sweep: str) -> list[str]:
    """scancel this sweep's SLURM jobs (and stop its local processes); returns the ids cancelled."""
    states = sweep_states(root, sweep)
    slurm_ids, local_pids = set(), []
    for state in states:
        job = read_job(Path(root) / sweep / state.run_id)
        if not job or state.state not in ("queued", "running"):
            continue  # nothing live behind it
        if job.get("executor") == "slurm":
            slurm_ids.add(str(job["job_id"]))
        elif job.get("executor") == "local":
            local_pids.append(int(job["job_id"]))
    if slurm_ids:
        subprocess.run(["scancel", *sorted(slurm_ids)], check=False, capture_output=True, text=True, timeout=60)
    for pid in local_pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return sorted(slurm_ids) + [str(pid) for pid in local_pids]


def wait_for_sweep(root: Path, sweep: str, poll_s: float = 5.0, timeout_s: float | None = None,
                   on_poll: Callable[[list[RunState]], None] | None = None) -> list[RunState]:
    """Poll run states until every run is done, failed or lost (never blocks on a dead job)."""
    start = time.time()
    while True:
        states = sweep_states(root, sweep)
        if on_poll:
            on_poll(states)
        if all(state.state in TERMINAL_STATES for state in states):
            return states
        if timeout_s is not None and time.time() - start > timeout_s:
            return states
        time.sleep(poll_s)
