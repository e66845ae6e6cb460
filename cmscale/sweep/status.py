"""Run states from the run directories, checked against the scheduler when a job looks stuck.

States: ``planned`` (never submitted), ``queued``, ``running``, ``done``, ``failed`` and ``lost``
(the run said it was running, its heartbeat went stale and no live job stands behind it). A run
packed with others into one job (``runs_per_job``) is ``queued`` until it starts, even while its
pack's job runs the runs before it; each run is reported, never the pack.
The run directory is the source of truth; ``squeue`` and ``sacct`` only decide whether a job
is still alive. Nothing here waits on a job: a job that died without a result is reported, never
awaited, and status works (with less detail) when ``sacct`` is unavailable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cmscale.cluster.slurm import ENDING_SUFFIX, LIVE_SLURM_STATES, slurm_job_states
from cmscale.rundir import (
    DONE_FILE,
    DONE_STATE_KEY,
    PACK_KEY,
    STATUS_FILE,
    RunState,
    heartbeat_age_s,
    pid_alive,
    read_job,
    read_json,
    read_sweep_file,
    same_process,
    sweep_dir,
)

# How many heartbeat intervals of silence make a running run suspect.
STALE_HEARTBEATS = 2


@dataclass
class RunStatus:
    """What ``cmscale sweep status`` says about one run."""

    run_id: str
    state: RunState
    method: str
    preset: str
    job_id: str | None = None
    reason: str | None = None
    # The run's job has ended but its processes are still being killed (squeue: COMPLETING).
    # Relaunching now could let the old process write after the new one resumed; wait for it.
    ending: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _job_alive(job: dict, slurm_states: dict[str, str]) -> tuple[bool, str | None]:
    if job.get("executor") == "slurm":
        state = slurm_states.get(str(job.get("job_id")))
        if state is None:
            return False, None
        return state in LIVE_SLURM_STATES, state  # "CANCELLED+COMPLETING" is not live
    if job.get("executor") == "local":
        try:
            pid = int(job["job_id"])
        except (KeyError, ValueError):
            return False, None
        if "pid_start" in job:  # pid and start time: a later process given the same pid is not the job
            return same_process(pid, job["pid_start"]), None
        return pid_alive(pid), None
    return False, None


def run_state(run_id: str, run_dir: Path, config: dict, slurm_states: dict[str, str]) -> RunStatus:
    method, preset = config.get("method", "?"), config.get("preset", "?")
    done_path = run_dir / DONE_FILE
    job = read_job(run_dir)
    job_id = str(job["job_id"]) if job else None
    if done_path.is_file():
        try:
            done = read_json(done_path)
        except ValueError:
            return RunStatus(run_id, RunState.FAILED, method, preset, job_id, f"{done_path} is not valid JSON")
        state = RunState.DONE if done.get(DONE_STATE_KEY) == RunState.DONE else RunState.FAILED
        return RunStatus(run_id, state, method, preset, job_id, done.get("reason"))
    if job is None:
        return RunStatus(run_id, RunState.PLANNED, method, preset)
    alive, scheduler_state = _job_alive(job, slurm_states)
    status_path = run_dir / STATUS_FILE
    heartbeat_s = float(config.get("heartbeat_s", 10.0))
    if status_path.is_file():
        age = heartbeat_age_s(run_dir)
        stale = age is None or age > STALE_HEARTBEATS * heartbeat_s
        if alive:  # a local process that wrote status.json is running; a SLURM job may be requeued, pending
            state = _live_state(scheduler_state) if job.get("executor") == "slurm" else RunState.RUNNING
            return RunStatus(run_id, state, method, preset, job_id, scheduler_state)
        if not stale and (job.get("executor") != "slurm" or scheduler_state is None):
            # A fresh heartbeat with no scheduler answer (squeue unreachable) is a live run.
            return RunStatus(run_id, RunState.RUNNING, method, preset, job_id, "heartbeat fresh")
        reason = f"heartbeat {age:.0f}s old and no live job" if age is not None else "no heartbeat and no live job"
        reason = _stopped_reason(status_path) or reason
        if scheduler_state:
            reason += f" (scheduler: {scheduler_state})"
        return RunStatus(run_id, RunState.LOST, method, preset, job_id, reason, ending=_ending(scheduler_state))
    if alive and job.get(PACK_KEY):
        # Its pack's job runs (or waits); this run has not started: it waits for its turn in the pack.
        return RunStatus(run_id, RunState.QUEUED, method, preset, job_id, _pack_reason(run_id, job, scheduler_state))
    if alive and job.get("executor") != "slurm":  # its local process lives: the run is starting
        return RunStatus(run_id, RunState.RUNNING, method, preset, job_id, "starting")
    if alive:
        return RunStatus(run_id, _live_state(scheduler_state), method, preset, job_id, scheduler_state)
    if job.get("executor") == "slurm" and scheduler_state and scheduler_state not in LIVE_SLURM_STATES:
        return RunStatus(
            run_id,
            RunState.FAILED,
            method,
            preset,
            job_id,
            f"job ended as {scheduler_state} before the run started",
            ending=_ending(scheduler_state),
        )
    return RunStatus(
        run_id, RunState.LOST, method, preset, job_id, "the submitted job is gone and the run never started"
    )


def _stopped_reason(status_path: Path) -> str | None:
    """Why a run that is no longer alive stopped, when its status.json says it was interrupted."""
    try:
        status = read_json(status_path)
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("state") != RunState.INTERRUPTED:
        return None
    return (f"interrupted by {status.get('signal') or 'a signal'} at step {status.get('step', '?')}; "
            "its checkpoint resumes on relaunch")


def _pack_reason(run_id: str, job: dict, scheduler_state: str | None) -> str:
    pack = job[PACK_KEY]
    place = f"run {pack.index(run_id) + 1} of {len(pack)}" if run_id in pack else f"one of {len(pack)} runs"
    return f"{place} in pack job {job.get('job_id')}" + (f" ({scheduler_state})" if scheduler_state else "")


def _ending(scheduler_state: str | None) -> bool:
    return bool(scheduler_state and scheduler_state.endswith(ENDING_SUFFIX))


def _live_state(scheduler_state: str | None) -> RunState:
    running = ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT")
    return RunState.RUNNING if scheduler_state in running else RunState.QUEUED


def runs_states(base: Path, runs: list[tuple[str, dict]]) -> list[RunStatus]:
    """States of ``runs`` ((run id, config) pairs) from their folders under ``base``; the
    scheduler is asked about their own SLURM job ids only."""
    jobs = {run_id: read_job(base / run_id) for run_id, _ in runs}
    slurm_ids = [str(job["job_id"]) for job in jobs.values() if job and job.get("executor") == "slurm"]
    slurm_states = slurm_job_states(slurm_ids)
    return [run_state(run_id, base / run_id, config, slurm_states) for run_id, config in runs]


def sweep_states(root: Path, sweep: str) -> list[RunStatus]:
    plan = read_sweep_file(root, sweep)
    return runs_states(sweep_dir(root, sweep), [(run["run_id"], run["config"]) for run in plan["runs"]])


def count_states(states: list[RunStatus]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states:
        counts[state.state] = counts.get(state.state, 0) + 1
    return counts


# The progress fields a running trainer writes into status.json (at a bounded rate).
PROGRESS_FIELDS = ("step", "total_steps", "images_per_s", "loss", "eta_s", "updated")


@dataclass
class RunProgress:
    """How far a running run is, from its status.json; a field the trainer has not written is None."""

    run_id: str
    state: RunState
    step: int | None = None
    total_steps: int | None = None
    images_per_s: float | None = None
    loss: float | None = None
    eta_s: float | None = None
    updated: float | None = None

    @property
    def fraction(self) -> float | None:
        if self.step is None or not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)

    def as_dict(self) -> dict:
        return asdict(self) | {"fraction": self.fraction}


def run_progress(run_dir: Path, status: RunStatus) -> RunProgress:
    """``status``'s run with the progress fields of its status.json (all None when absent or unreadable)."""
    try:
        fields = read_json(Path(run_dir) / STATUS_FILE)
    except (FileNotFoundError, ValueError):
        fields = {}
    values = {}
    for name in PROGRESS_FIELDS:
        value = fields.get(name)
        values[name] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    for name in ("step", "total_steps"):
        values[name] = int(values[name]) if values[name] is not None else None
    return RunProgress(status.run_id, status.state, **values)


def sweep_progress(root: Path, sweep: str, states: list[RunStatus]) -> list[RunProgress]:
    """Progress of the sweep's running runs, in plan order."""
    base = sweep_dir(root, sweep)
    return [run_progress(base / state.run_id, state) for state in states if state.state == RunState.RUNNING]
