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


# Job ids per squeue/sacct call: a sweep of thousands of arrays still makes short command lines.
QUERY_BATCH = 100


def _base_ids(job_ids: list[str]) -> list[str]:
    """``123_4`` -> ``123``: one id per array (``squeue -r -j 123`` lists its tasks), in numeric order."""
    bases = {job.split("_")[0] for job in job_ids}
    return sorted(bases, key=lambda job: (len(job), job))


def _batches(ids: list[str]) -> list[str]:
    return [",".join(ids[start:start + QUERY_BATCH]) for start in range(0, len(ids), QUERY_BATCH)]


def _ask(command: list[str]) -> str | None:
    """The command's output, or None when it fails or is not installed (the run folders decide then)."""
    try:
        answer = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return answer.stdout if answer.returncode == 0 else None


def slurm_job_states(job_ids: list[str]) -> dict[str, str]:
    """Scheduler state per job id (``123`` or ``123_4``); empty if SLURM is not reachable.

    Only these jobs are asked about (``squeue -j`` and ``sacct -j`` with their ids, in batches of
    ``QUERY_BATCH``): on a shared cluster of thousands of jobs, listing the whole queue on every
    poll is what administrators forbid. squeue (one line per array task with ``-r``) answers for
    live and recently ended jobs; sacct fills in older ones when accounting runs. Neither is
    required: a job neither knows is reported as unknown, and the run's own files decide its state.
    """
    if not job_ids:
        return {}
    wanted = set(job_ids)
    states: dict[str, str] = {}
    for batch in _batches(_base_ids(job_ids)):
        # An id squeue no longer knows makes it exit 1 only when it knows none of the batch.
        queued = _ask(["squeue", "-r", "-h", "-o", "%i %T", "--states=all", "-j", batch])
        if queued is not None:
            _parse_states(queued, None, states, overwrite=True)
    states = {job: state for job, state in states.items() if job in wanted}
    # squeue shows a job being torn down as COMPLETING whatever its end; sacct knows whether it
    # was cancelled (the run is over) or requeued (it will run again), so ask it for those too.
    missing = [job for job in job_ids if states.get(job, "COMPLETING") == "COMPLETING"]
    answered: dict[str, str] = {}
    for batch in _batches(_base_ids(missing)):
        accounted = _ask(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", batch])
        if accounted is not None:
            _parse_states(accounted, "|", answered, overwrite=True)
    for job in missing:
        if job not in answered:
            continue
        if job not in states:
            states[job] = answered[job]
        elif answered[job] not in LIVE_SLURM_STATES:
            states[job] = answered[job] + ENDING_SUFFIX
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
