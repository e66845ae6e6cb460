"""What the SLURM scheduler says: job states (squeue, then sacct), array limits, this job's id.

Nothing here is required: off a cluster, or with accounting off, the answers are empty and the
run directories decide.
"""

from __future__ import annotations

import os
import subprocess

LIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                     "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
ENDING_SUFFIX = "+COMPLETING"  # an ended job whose processes are still being killed


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
        queued = subprocess.run(["squeue", "-r", "-h", "-o", "%i %T", "--states=all"], capture_output=True, text=True,
                                timeout=30)
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
                [
                    "sacct",
                    "-n",
                    "-X",
                    "-P",
                    "-o",
                    "JobID,State",
                    "-j",
                    ",".join(sorted({j.split("_")[0] for j in missing})),
                ],
                capture_output=True,
                text=True,
                timeout=30,
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


def cluster_max_array_size() -> int | None:
    """MaxArraySize from ``scontrol show config`` (task indices must be below it); None off-cluster."""
    try:
        output = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in output.splitlines():
        if line.strip().startswith("MaxArraySize"):
            try:
                return int(line.split("=", 1)[1].strip())
            except ValueError:
                return None
    return None


def current_job_id() -> str | None:
    """This process's SLURM job id as submitit names it (``ARRAY_TASK`` inside an array)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")
