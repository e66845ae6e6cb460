"""Launching a sweep: submit its planned runs (idempotent), relaunch failed ones, cancel, follow.

Bookkeeping lives on disk so that the launcher can die at any time: the plan in
``<root>/<sweep>/sweep.json`` (:mod:`cmscale.sweep.plan`), each submission in the run's job.json
and submitit's files in ``<root>/<sweep>/_submitit/`` (:mod:`cmscale.rundir`). Where the runs go
(SLURM arrays or local processes) is the launcher's business (:mod:`cmscale.cluster.launchers`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cmscale.cluster.launchers import LAUNCHERS, LaunchReport, make_launcher
from cmscale.rundir import DONE_FILE, LIVE_STATES, TERMINAL_STATES, RunState, read_job, same_process
from cmscale.sweep.plan import PlannedRun, check_sweep_identity, sweep_dir, write_sweep_file
from cmscale.sweep.spec import SweepSpec
from cmscale.sweep.status import RunStatus, runs_states, sweep_states


def _select(runs: list[PlannedRun], states: dict[str, RunStatus], wanted: set[str],
            report: LaunchReport) -> tuple[list[PlannedRun], dict[str, str], set[str]]:
    """Runs to submit, live teacher job ids (for dependencies) and the ids already done."""
    live_jobs: dict[str, str] = {}
    done: set[str] = set()
    chosen: list[PlannedRun] = []
    for run in runs:
        state = states[run.run_id]
        if state.state == RunState.DONE:
            done.add(run.run_id)
            report.skipped[run.run_id] = "done"
        elif state.state in LIVE_STATES:
            live_jobs[run.run_id] = state.job_id or ""
            report.skipped[run.run_id] = f"{state.state} as job {state.job_id}"
        elif state.state in wanted and state.ending:
            report.skipped[run.run_id] = (
                f"its job {state.job_id} is still being killed; relaunch again in a few seconds"
            )
        elif state.state in wanted:
            chosen.append(run)
        else:
            report.skipped[run.run_id] = state.state
    chosen_ids = {run.run_id for run in chosen}
    ready = []
    for run in chosen:
        blocked = [dep for dep in run.depends_on if dep not in done and dep not in live_jobs and dep not in chosen_ids]
        if blocked:
            report.skipped[run.run_id] = (
                f"teacher {blocked[0]} is not done, queued or being submitted; relaunch it first"
            )
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
    wanted: frozenset[str] = frozenset({RunState.PLANNED}),
    on_finish: Callable[[PlannedRun, str], None] | None = None,
    spec_path: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    new_version: bool = False,
    script_dir: Path | None = None,
    overrides: dict | None = None,
) -> LaunchReport:
    """Submit the runs in state ``wanted`` (default: never submitted) through ``executor``'s launcher.

    A different spec already launched under the sweep's name is refused unless ``new_version``.
    ``dry_run`` selects exactly as a real launch does (runs done, queued or running are skipped)
    and submits nothing; for SLURM it writes the sbatch files into ``script_dir`` (default
    ``<root>/<sweep>/_dry_run``)."""
    root = Path(root)
    report = LaunchReport()
    launcher_class = LAUNCHERS.get(executor)
    if launcher_class is None:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(LAUNCHERS)}")
    profile = (profile_name or spec.executor.profile) if launcher_class.uses_profile else None
    stored_path = str(Path(spec_path).resolve()) if spec_path else ""
    if not dry_run:
        write_sweep_file(root, spec.name, runs, spec_path=stored_path, executor=executor, profile=profile,
                         spec=spec, new_version=new_version, overrides=overrides)
        states = {state.run_id: state for state in sweep_states(root, spec.name)}
    else:  # the same selection as a real launch: from the run folders as they are now
        check_sweep_identity(root, spec, runs, stored_path, new_version)
        pairs = [(run.run_id, run.config.model_dump(mode="json")) for run in runs]
        states = {state.run_id: state for state in runs_states(sweep_dir(root, spec.name), pairs)}
    ready, live_jobs, done = _select(runs, states, set(wanted), report)
    if not dry_run:
        for run in ready:
            _archive_done_file(run.run_dir(root))
    if not ready:
        return report
    where = "--profile" if profile_name else f"{spec_path or '<spec>'}: invalid configuration\n  - executor.profile"
    launcher = make_launcher(executor, root, spec.name, profile_name=profile, profile_where=where,
                             max_parallel=spec.executor.max_parallel, timeout_min=spec.executor.timeout_min,
                             dry_run=dry_run, on_finish=on_finish, on_progress=on_progress,
                             runs_per_job=spec.executor.runs_per_job, script_dir=script_dir)
    launcher.launch(ready, report, live_jobs, done)
    return report


def cancel_sweep(root: Path, sweep: str) -> list[str]:
    """scancel this sweep's SLURM jobs (and stop its local processes); returns the ids cancelled.

    A local job is signalled only while its pid still names the process it recorded (pid and
    start time in job.json): a pid reused by another process since is never signalled."""
    states = sweep_states(root, sweep)
    slurm_ids, local_pids = set(), []
    for state in states:
        job = read_job(Path(root) / sweep / state.run_id)
        if not job or state.state not in LIVE_STATES:
            continue  # nothing live behind it
        if job.get("executor") == "slurm":
            slurm_ids.add(str(job["job_id"]))
        elif job.get("executor") == "local" and str(job.get("job_id", "")).isdigit():
            pid = int(job["job_id"])
            if pid not in local_pids and same_process(pid, job.get("pid_start")):  # packs share a pid
                local_pids.append(pid)
    if slurm_ids:
        subprocess.run(["scancel", *sorted(slurm_ids)], check=False, capture_output=True, text=True, timeout=60)
    for pid in local_pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return sorted(slurm_ids) + [str(pid) for pid in local_pids]


# Polling under --wait: each poll that finds nothing changed waits longer, up to MAX_POLL_S;
# a change starts again at the first interval. A sweep of day-long runs then asks the scheduler
# about once a minute, while a short one is still followed closely.
POLL_BACKOFF = 1.5
MAX_POLL_S = 60.0


def poll_intervals(first_s: float, max_s: float = MAX_POLL_S, factor: float = POLL_BACKOFF):
    """Sleep lengths of an unchanged sweep: first_s, first_s * factor, ... capped at max_s."""
    interval = first_s
    while True:
        yield interval
        interval = min(max(interval, 1e-3) * factor, max(max_s, first_s))


def wait_for_sweep(root: Path, sweep: str, poll_s: float = 5.0, timeout_s: float | None = None,
                   on_poll: Callable[[list[RunStatus]], None] | None = None, max_poll_s: float = MAX_POLL_S,
                   sleep: Callable[[float], None] = time.sleep) -> list[RunStatus]:
    """Poll run states until every run is done, failed or lost (never blocks on a dead job).

    The interval starts at ``poll_s`` and backs off (x1.5, at most ``max_poll_s``) while no run
    changes state; a change brings it back to ``poll_s``."""
    start = time.time()
    last = None
    intervals = poll_intervals(poll_s, max_poll_s)
    while True:
        states = sweep_states(root, sweep)
        if on_poll:
            on_poll(states)
        if all(state.state in TERMINAL_STATES for state in states):
            return states
        if timeout_s is not None and time.time() - start > timeout_s:
            return states
        now = [(state.run_id, state.state) for state in states]
        if now != last:
            intervals = poll_intervals(poll_s, max_poll_s)
            last = now
        sleep(next(intervals))
