"""The on-disk contract between training jobs, the sweep and search layers and the store.

Every file name lives here. A results root holds::

    <root>/cmscale.duckdb                 the store (written only by ``cmscale results ingest``)
    <root>/<sweep>/sweep.json             the sweep's plan (run ids, stages, dependencies, configs,
                                          ``iterations``)
    <root>/<sweep>/_submitit/             submitit's pickles and logs (sweeps and searches)
    <root>/<study>/tune.json              an Optuna search: spec, storage, workers
    <root>/<study>/optuna.journal         its default storage; ``claim.lock`` serialises claims
    <root>/<sweep>/<run_id>/              one run, which writes only into its own directory:
        config.json      resolved run config (written once, atomically, before the first step); the
                         iteration count is stored as ``budget_iters_resolved``
        metrics.jsonl    append-only, one JSON object per line; rows have ``kind`` "train" or "eval"
        status.json      {"state": RunState, "host", "pid", "slurm_job_id", "updated", ...}
        heartbeat        its mtime is refreshed every few seconds while the run is alive
        done.json        {"status": "done"|"failed"|"pruned", "reason", "finished", ...} written once
        job.json         how and when the run was last submitted (executor, job id, attempt; ``pack``:
                         the run ids of its job, in order, when several runs share one job)
        trial.json       the Optuna trial behind the run (searches only); a retry keeps the failed
                         attempts under ``earlier_attempts``
        ckpt/            latest.pt (resume state), previous.pt (the one before, kept until latest.pt
                         is complete) and final.pt (EMA network), written atomically; every one
                         carries preset, resolution, img_channels, sigma_data and method
        samples/         PNG sample grids from evals

``done.json`` names its state ``status`` and ``status.json`` names it ``state``: both keys are kept
as they are for the files already on disk; both hold a :class:`RunState` value.

Train rows: kind, step, images_seen, train_flops, loss, wall_s.
Eval rows:  kind, step, train_flops, images_seen, sampler_steps, nfe, fid, num_samples,
            extractor, reference, sampling_flops_per_image, wall_s.

Jobs never open the DuckDB database; ``cmscale results ingest`` reads these files.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

# results root
DB_FILE = "cmscale.duckdb"
INGEST_LOCK_FILE = ".cmscale-ingest.lock"
# a sweep's or a study's folder
SWEEP_FILE = "sweep.json"
SUBMITIT_DIR = "_submitit"
TUNE_FILE = "tune.json"
JOURNAL_FILE = "optuna.journal"
CLAIM_LOCK = "claim.lock"
# a run's folder
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
HEARTBEAT_FILE = "heartbeat"
DONE_FILE = "done.json"
JOB_FILE = "job.json"
TRIAL_FILE = "trial.json"
CKPT_DIR = "ckpt"
LATEST_CHECKPOINT = "latest.pt"
PREVIOUS_CHECKPOINT = "previous.pt"  # the last good one, kept until the next is complete on disk
FINAL_CHECKPOINT = "final.pt"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"  # event files, with tensorboard = true
# keys whose names the files keep for compatibility (see the module docstring)
DONE_STATE_KEY = "status"
STATUS_STATE_KEY = "state"
ITERATIONS_KEY = "budget_iters_resolved"  # config.json's name for the run's iteration count
PACK_KEY = "pack"  # job.json: the run ids sharing the run's job (packed runs only), in training order


class RunState(StrEnum):
    """Every state a run can be in, as written to status.json/done.json or derived by sweep status.

    The trainer writes RUNNING, DONE, FAILED, PRUNED (stopped by a search), INTERRUPTED (a signal
    between steps) and REQUEUED (checkpointed before submitit requeues it). The sweep layer adds
    PLANNED (never submitted), QUEUED (a live job that has not started) and LOST (the run said it
    was running, its heartbeat went stale and no live job stands behind it).
    """

    PLANNED = "planned"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    PRUNED = "pruned"
    INTERRUPTED = "interrupted"
    REQUEUED = "requeued"
    LOST = "lost"


TERMINAL_STATES = frozenset({RunState.DONE, RunState.FAILED, RunState.LOST})
LIVE_STATES = frozenset({RunState.QUEUED, RunState.RUNNING})


def final_checkpoint(run_dir: Path) -> Path:
    """Where a finished run keeps its EMA network (a student's teacher checkpoint)."""
    return Path(run_dir) / CKPT_DIR / FINAL_CHECKPOINT


def latest_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the state it resumes from."""
    return Path(run_dir) / CKPT_DIR / LATEST_CHECKPOINT


def previous_checkpoint(run_dir: Path) -> Path:
    """The state before the latest, kept until the latest is complete (a resume falls back to it)."""
    return Path(run_dir) / CKPT_DIR / PREVIOUS_CHECKPOINT


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)  # a full disk or a signal: no temporary file is left behind
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def budget_in_flops(budget_flops: float | None, iterations: int | None, flops_per_step: float | None) -> float | None:
    """A run's compute budget in FLOPs: its FLOP budget, else its iterations times the FLOPs of a step
    (so iteration-budget runs sit on iso-FLOP plots too); None when neither is known."""
    if budget_flops:
        return budget_flops
    if iterations is None or flops_per_step is None:
        return None
    return iterations * flops_per_step


class MetricsWriter:
    """Append-only writer of ``metrics.jsonl``.

    Each row is written with a single ``write`` of one complete line and flushed, so a reader
    sees at most one torn line (the last), which the store skips until it is complete.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_torn_tail()
        self._handle = open(self.path, "a")

    def _repair_torn_tail(self) -> None:
        # A job killed mid-write leaves a partial last line; the resumed job drops it so the
        # next row starts on a fresh line instead of being glued to the fragment.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            handle.truncate(cut)

    def write(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(row, default=float) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Complete rows of a ``metrics.jsonl`` (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path) as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            row = json.loads(line)
            if kind is None or row.get("kind") == kind:
                rows.append(row)
    return rows


def truncate_metrics_after(path: Path, last_step: int) -> None:
    """Drop rows with ``step > last_step``: on resume, rows logged after the checkpoint are redone."""
    path = Path(path)
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if int(row.get("step", 0)) <= last_step]
    atomic_write_bytes(path, "".join(json.dumps(row, default=float) + "\n" for row in kept).encode())


def read_job(run_dir: Path) -> dict[str, Any] | None:
    """The run's job.json, or None when it was never submitted (or the file is torn)."""
    try:
        return read_json(Path(run_dir) / JOB_FILE)
    except (FileNotFoundError, ValueError):
        return None


def write_status(run_dir: Path, state: RunState, **extra: Any) -> None:
    atomic_write_json(
        Path(run_dir) / STATUS_FILE,
        {
            STATUS_STATE_KEY: RunState(state),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "updated": time.time(),
            **extra,
        },
    )


def touch_heartbeat(run_dir: Path) -> None:
    path = Path(run_dir) / HEARTBEAT_FILE
    path.touch()
    os.utime(path, None)


def heartbeat_age_s(run_dir: Path) -> float | None:
    path = Path(run_dir) / HEARTBEAT_FILE
    if not path.exists():
        return None
    return time.time() - path.stat().st_mtime


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22), or None
    where it is gone or /proc is missing. With the pid it names one process: pids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def same_process(pid: int, start_time: int | None) -> bool:
    """Whether ``pid`` is alive and still the process that started at ``start_time`` (not a later
    process that was given the same pid). Without a recorded start time nothing can be verified."""
    return start_time is not None and pid_alive(pid) and process_start_time(pid) == start_time


def process_descendants(pid: int) -> list[int]:
    """The pids of every live descendant of ``pid`` (children first), from /proc."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        children = [child for parent in frontier for child in parents.get(parent, [])]
        found += children
        frontier = children
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with ``pid`` is alive (a zombie, dead but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child not yet waited for still answers kill(0)
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class Heartbeat:
    """Touches ``run_dir/heartbeat`` every ``interval_s`` from a daemon thread while the run lives.

    It creates ``run_dir`` if needed, so a caller (the Optuna worker) can start beating from the
    moment it claims a run, before the trainer has built anything."""

    def __init__(self, run_dir: Path, interval_s: float):
        self.run_dir = Path(run_dir)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.is_set():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            touch_heartbeat(self.run_dir)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def sweep_dir(root: Path | str, sweep: str) -> Path:
    """Where sweep ``sweep`` keeps its plan (``sweep.json``) and its runs' folders."""
    return Path(root) / sweep


def read_sweep_file(root: Path | str, sweep: str) -> dict[str, Any]:
    """The plan on disk (written by :func:`cmscale.sweep.plan.write_sweep_file`); read here, with
    no torch import, so that status works in the light install."""
    path = sweep_dir(root, sweep) / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no sweep {sweep!r} under {root} ({path} missing); launch it first with `cmscale sweep launch SPEC`")
    return read_json(path)
