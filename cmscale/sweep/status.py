"""Run states from the run directories, checked against the scheduler when a job looks stuck.

States: ``planned`` (never submitted), ``queued``, ``running``, ``done``, ``failed`` and ``lost``
(the run said it was running, its heartbeat went stale and no live job stands behind it).
The run directory is the source of truth; ``squeue`` and ``sacct`` only decide whether a job
is still alive. Nothing here waits on a job: a job that died without a result is reported, never
awaited, and status works (with less detail) when ``sacct`` is unavailable.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from cmscale.rundir import DONE_FILE, STATUS_FILE, heartbeat_age_s, pid_alive, read_json
from cmscale.sweep.launch import read_job, read_sweep_file, sweep_dir

LIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
ENDING_SUFFIX = "+COMPLETING"  # an ended job whose processes are still being killed
# How many heartbeat intervals of silence make a running run suspect.
STALE_HEARTBEATS = 2


@dataclass
class RunState:
    run_id: str
    state: str
    method: str
    preset: str
    job_id: str | None = None
    reason: str | None = None
    # The run's job has ended but its processes are still being killed (squeue: COMPLETING).
    # Relaunching now could let the old process write after the new one resumed; wait for it.
    ending: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def expand_job_ids(job_id: str) -> list[str]:
    """``5_[0-3,7%2]`` (a pending array as squeue and sacct print it) -> ``5_0 .. 5_3, 5_7``."""
    base, bracket, rest = job_id.partition("_[")
    if not bracket:
        return [job_id]
    ids = []
    for part in rest.rstrip("]").split("%")[0].split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            ids += [f"{base}_{task}" for task in range(int(first), int(last or first) + 1)]
    return ids


def _parse_states(lines: str, separator: str | None, states: dict[str, str], overwrite: bool) -> None:
    for line in lines.splitlines():
        parts = line.split(separator) if separator else line.split()
        if len(parts) < 2 or not parts[0]:
            continue
        state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"
        for job in expand_job_ids(parts[0].strip()):
            if overwrite or job not in states:
                states[job] = state


def slurm_job_states(job_ids: list[str]) -> dict[str, str]:
    """Scheduler state per job id (``123`` or ``123_4``); empty if SLURM is not reachable.

    squeue (one line per array task with ``-r``) answers for live and recently ended jobs; sacct
    fills in older ones when accounting runs. Neither is required: a job neither knows is
    reported as unknown, and the run's own files decide its state.
    """
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    try:
        queued = subprocess.run(["squeue", "-r", "-h", "-o", "%i %T", "--states=all"], capture_output=True, text=True, timeout=30)
        if queued.returncode == 0:
            _parse_states(queued.stdout, None, states, overwrite=True)
    except (OSError, subprocess.TimeoutExpired):
        pass
    # squeue shows a job being torn down as COMPLETING whatever its end; sacct knows whether it
    # was cancelled (the run is over) or requeued (it will run again), so ask it for those too.
    missing = [job for job in job_ids if states.get(job, "COMPLETING") == "COMPLETING"]
    if missing:
        try:
            accounted = subprocess.run(
                ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(sorted({j.split("_")[0] for j in missing}))],
                capture_output=True, text=True, timeout=30,
            )
            if accounted.returncode == 0:
                answered: dict[str, str] = {}
                _parse_states(accounted.stdout, "|", answered, overwrite=True)
                for job in missing:
                    if job not in answered:
                        continue
                    if job not in states:
                        states[job] = answered[job]
                    elif answered[job] not in LIVE_SLURM_STATES:
                        states[job] = answered[job] + ENDING_SUFFIX
        except (OSError, subprocess.TimeoutExpired):
            pass
    return states


def _job_alive(job: dict, slurm_states: dict[str, str]) -> tuple[bool, str | None]:
    if job.get("executor") == "slurm":
        state = slurm_states.get(str(job.get("job_id")))
        if state is None:
            return False, None
        return state in LIVE_SLURM_STATES, state  # "CANCELLED+COMPLETING" is not live
    if job.get("executor") == "local":
        try:
            return pid_alive(int(job["job_id"])), None
        except (KeyError, ValueError):
            return False, None
    return False, None


def run_state(run_id: str, run_dir: Path, config: dict, slurm_states: dict[str, str]) -> RunState:
    method, preset = config.get("method", "?"), config.get("preset", "?")
    done_path = run_dir / DONE_FILE
    job = read_job(run_dir)
    job_id = str(job["job_id"]) if job else None
    if done_path.is_file():
        try:
            done = read_json(done_path)
        except ValueError:
            return RunState(run_id, "failed", method, preset, job_id, f"{done_path} is not valid JSON")
        state = "done" if done.get("status") == "done" else "failed"
        return RunState(run_id, state, method, preset, job_id, done.get("reason"))
    if job is None:
        return RunState(run_id, "planned", method, preset)
    alive, scheduler_state = _job_alive(job, slurm_states)
    status_path = run_dir / STATUS_FILE
    heartbeat_s = float(config.get("heartbeat_s", 10.0))
    if status_path.is_file():
        age = heartbeat_age_s(run_dir)
        stale = age is None or age > STALE_HEARTBEATS * heartbeat_s
        if alive:
            return RunState(run_id, _live_state(scheduler_state), method, preset, job_id, scheduler_state)
        if not stale and (job.get("executor") != "slurm" or scheduler_state is None):
            # A fresh heartbeat with no scheduler answer (squeue unreachable) is a live run.
            return RunState(run_id, "running", method, preset, job_id, "heartbeat fresh")
        reason = f"heartbeat {age:.0f}s old and no live job" if age is not None else "no heartbeat and no live job"
        if scheduler_state:
            reason += f" (scheduler: {scheduler_state})"
        return RunState(run_id, "lost", method, preset, job_id, reason, ending=_ending(scheduler_state))
    if alive:
        return RunState(run_id, _live_state(scheduler_state), method, preset, job_id, scheduler_state)
    if job.get("executor") == "slurm" and scheduler_state and scheduler_state not in LIVE_SLURM_STATES:
        return RunState(run_id, "failed", method, preset, job_id, f"job ended as {scheduler_state} before the run started",
                        ending=_ending(scheduler_state))
    return RunState(run_id, "lost", method, preset, job_id, "the submitted job is gone and the run never started")


def _ending(scheduler_state: str | None) -> bool:
    return bool(scheduler_state and scheduler_state.endswith(ENDING_SUFFIX))


def _live_state(scheduler_state: str | None) -> str:
    return "running" if scheduler_state in ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT") else "queued"


def sweep_states(root: Path, sweep: str) -> list[RunState]:
    plan = read_sweep_file(root, sweep)
    base = sweep_dir(root, sweep)
    jobs = {run["run_id"]: read_job(base / run["run_id"]) for run in plan["runs"]}
    slurm_ids = [str(job["job_id"]) for job in jobs.values() if job and job.get("executor") == "slurm"]
    slurm_states = slurm_job_states(slurm_ids)
    return [run_state(run["run_id"], base / run["run_id"], run["config"], slurm_states) for run in plan["runs"]]


def count_states(states: list[RunState]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states:
        counts[state.state] = counts.get(state.state, 0) + 1
    return counts
