"""What one ingest did: the rows written, the files re-read or torn, and each problem with the path
of the file at fault (:class:`IngestReport`, returned by :func:`cmscale.results.ingest`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class FileProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class IngestReport:
    """What one :func:`ingest` call did."""

    root: str
    train_rows: int = 0  # train rows written (new or replaced)
    eval_rows: int = 0
    runs: int = 0  # run rows written
    sweeps: int = 0
    trials: int = 0
    runs_deleted: int = 0
    metrics_files_read: int = 0
    bytes_parsed: int = 0
    reset_files: list[str] = field(default_factory=list)  # metrics files re-read from the start
    torn_files: list[str] = field(default_factory=list)  # files whose last line was incomplete
    warnings: list[str] = field(default_factory=list)
    errors: list[FileProblem] = field(default_factory=list)  # malformed files (named, skipped)
    transactions: int = 0
    lock_wait_s: float = 0.0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.train_rows or self.eval_rows or self.runs or self.sweeps or self.trials or self.runs_deleted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root, "train_rows": self.train_rows, "eval_rows": self.eval_rows,
            "runs": self.runs, "sweeps": self.sweeps, "trials": self.trials,
            "runs_deleted": self.runs_deleted, "metrics_files_read": self.metrics_files_read,
            "bytes_parsed": self.bytes_parsed, "reset_files": self.reset_files,
            "torn_files": self.torn_files, "warnings": self.warnings,
            "errors": [{"path": e.path, "message": e.message} for e in self.errors],
            "transactions": self.transactions, "lock_wait_s": round(self.lock_wait_s, 4),
            "seconds": round(self.seconds, 4),
        }

    def add_lock_wait(self, seconds: float) -> None:
        self.lock_wait_s += seconds

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    def error(self, path: Path | str, message: str) -> None:
        if any(p.path == str(path) and p.message == message for p in self.errors):
            return
        problem = FileProblem(str(path), message)
        self.errors.append(problem)
        log.warning(str(problem))
