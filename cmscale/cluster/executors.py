"""The one builder of submitit executors, for sweeps and searches alike.

Kinds: ``slurm`` (submitit's SLURM executor with a cluster profile), ``local`` (one process per
job on this machine) and ``debug`` (in this process, one job at a time, under submitit's debugger).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from cmscale.cluster.profiles import Profile

ExecutorKind = Literal["local", "slurm", "debug"]
EXECUTORS: tuple[str, ...] = get_args(ExecutorKind)
THREADS_ENV = "CMSCALE_NUM_THREADS"  # torch threads of each job (read by the trainer)


def make_executor(kind: str, folder: Path | str, *, name: str, profile: Profile | None = None,
                  timeout_min: int = 60, array_parallelism: int | None = None) -> Any:
    """A submitit executor writing its pickles and logs under ``folder`` (``%j`` is the job id).

    ``slurm`` needs ``profile``; ``array_parallelism`` caps the tasks of an array running at once
    (default: the profile's). ``local`` jobs stop after ``timeout_min``.
    """
    import submitit

    if kind == "slurm":
        if profile is None:
            raise ValueError("the slurm executor needs a cluster profile")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=profile.max_num_timeout)
        executor.update_parameters(name=name, **profile.submitit_parameters())
        if array_parallelism is not None:
            executor.update_parameters(slurm_array_parallelism=array_parallelism)
        return executor
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=timeout_min)
        return executor
    raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def detaches(kind: str) -> bool:
    """Whether jobs of this kind outlive the process that submits them (SLURM): callers then follow
    them from the run folders instead of waiting for them."""
    return kind == "slurm"


def in_process(kind: str) -> bool:
    """Whether jobs of this kind run inside the submitting process (debug)."""
    return kind == "debug"


def cores_per_job(parallel: int) -> int:
    """This machine's cores split between ``parallel`` local jobs, so they do not oversubscribe."""
    return max(1, (os.cpu_count() or 1) // parallel)
