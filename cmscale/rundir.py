"""The run directory: the one on-disk contract between a training job, the sweep layer and the store.

A run writes only into its own directory::

    <root>/<sweep>/<run_id>/
        config.json      resolved run config (written once, atomically, before the first step)
        metrics.jsonl    append-only, one JSON object per line; rows have ``kind`` "train" or "eval"
        status.json      {"state": "running"|"done"|"failed", "host", "pid", "slurm_job_id", "updated"}
        heartbeat        its mtime is refreshed every few seconds while the run is alive
        done.json        {"status": "done"|"failed", "reason", "finished", ...} written once at the end
        ckpt/            checkpoints, written atomically (tmp file then rename)
        samples/         PNG sample grids from evals

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
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
HEARTBEAT_FILE = "heartbeat"
DONE_FILE = "done.json"
CKPT_DIR = "ckpt"
SAMPLES_DIR = "samples"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp_path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


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


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    atomic_write_json(
        Path(run_dir) / STATUS_FILE,
        {
            "state": state,
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
