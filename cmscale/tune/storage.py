"""A study on disk: its folder, its ``tune.json`` (the spec and its versions) and Optuna's journal.

Under the results root (file names in :mod:`cmscale.rundir`)::

    <root>/<study>/tune.json        the validated spec, the storage URL, n_trials, submitted jobs
    <root>/<study>/optuna.journal   Optuna's JournalStorage (the default storage; any URL is accepted)

The journal is Optuna's file backend made safe against a torn last line (:class:`TornSafeJournal`),
locked by an ``open(O_CREAT | O_EXCL)`` lock file (Optuna's JournalFileOpenLock), which is safe on
NFS, unlike symlink or fcntl locks. The study itself (claims, zombies, summaries) is
:mod:`cmscale.tune.study`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from cmscale.rundir import JOURNAL_FILE, TUNE_FILE, atomic_write_json, read_json
from cmscale.tune.spec import TuneSpec

log = logging.getLogger(__name__)


class TuneError(RuntimeError):
    """A study cannot be used as asked (missing, or its storage does not open)."""


def study_dir(root: Path | str, name: str) -> Path:
    return Path(root) / name


def default_storage_path(root: Path | str, name: str) -> Path:
    return study_dir(root, name).resolve() / JOURNAL_FILE


class TornSafeJournal(JournalFileBackend):
    """Optuna's journal file, safe against a torn last line (a worker killed mid-write, a full disk).

    Optuna ignores an incomplete last line, but appends the next record right after it: the two
    become one undecodable line and every later read raises. Here a read says that it stopped at an
    incomplete last line, an append first cuts that line off (it was never a record: records end in
    a newline, written under the lock), and a damaged line inside the file is one error naming the
    file, the byte and the fix."""

    def __init__(self, path: str, lock_obj: Any = None):
        super().__init__(path, lock_obj=lock_obj)
        self._path = path

    def read_logs(self, log_number_from: int):
        try:
            yield from super().read_logs(log_number_from)
        except ValueError as error:  # json.JSONDecodeError, or Optuna's "Invalid log format."
            raise TuneError(
                f"{self._path}: a record inside the journal is damaged ({error}); the study cannot be read past "
                "it. Keep a copy, then cut the file before the damaged line (for example with `head -c BYTES`) to "
                "go on from the records before it"
            ) from None
        torn = self._torn_tail()
        if torn:
            log.warning("%s: stopped at an incomplete last line (%d bytes, a write cut short); it is not a record "
                        "and is dropped before the next record is written", self._path, torn)

    def _torn_tail(self) -> int:
        """Bytes after the last newline (0 when the file ends with a complete record)."""
        try:
            with open(self._path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                if size == 0:
                    return 0
                start = max(0, size - (1 << 16))
                handle.seek(start)
                tail = handle.read()
        except FileNotFoundError:
            return 0
        newline = tail.rfind(b"\n")
        if newline < 0 and start > 0:
            return 0  # a single line longer than the window: not a torn write of one record; leave it
        return len(tail) - (newline + 1)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        from optuna.storages.journal._file import get_lock_file

        with get_lock_file(self._lock):
            torn = self._torn_tail()
            if torn:
                size = os.path.getsize(self._path)
                log.warning("%s: cut an incomplete last line (%d bytes) before writing the next record",
                            self._path, torn)
                os.truncate(self._path, size - torn)
            payload = "\n".join(json.dumps(record, separators=(",", ":")) for record in logs) + "\n"
            with open(self._path, "ab") as handle:
                handle.write(payload.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())


def open_storage(url: str | None, root: Path | str, name: str) -> BaseStorage:
    """The study's storage: a JournalStorage file with an open(O_EXCL) lock, or the URL given."""
    if url:
        return optuna.storages.get_storage(url)
    path = default_storage_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock file is optuna.journal.lock, the name optuna-dashboard's symlink lock also takes.
    try:
        return JournalStorage(TornSafeJournal(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except TuneError:
        raise
    except (ValueError, KeyError) as error:
        raise TuneError(f"{path}: the journal cannot be replayed ({error}); keep a copy and cut the file before "
                        "the damaged record, or start the study under a new name") from None


def write_tune_file(root: Path | str, spec: TuneSpec, spec_path: str, extra: dict[str, Any] | None = None) -> None:
    path = study_dir(root, spec.name) / TUNE_FILE
    previous = read_json(path) if path.is_file() else {}
    versions = list(previous.get("versions") or [])
    if spec_digest(spec) not in [version.get("spec_digest") for version in versions]:
        versions.append({"spec_digest": spec_digest(spec), "spec_path": spec_path, "updated": time.time()})
    atomic_write_json(path, previous | {
        "versions": versions,
        "study": spec.name,
        "spec_path": spec_path,
        "spec": spec.model_dump(mode="json"),
        "storage": spec.storage or str(default_storage_path(root, spec.name)),
        "n_trials": spec.n_trials,
        "updated": time.time(),
    } | (extra or {}))


def read_tune_file(root: Path | str, name: str) -> dict[str, Any]:
    path = study_dir(root, name) / TUNE_FILE
    if not path.is_file():
        raise TuneError(f"no study {name!r} under {root} ({path} missing); start it with `cmscale tune run SPEC`")
    return read_json(path)


def stored_spec(root: Path | str, name: str) -> TuneSpec:
    return TuneSpec.model_validate(read_tune_file(root, name)["spec"])


def spec_digest(spec: TuneSpec) -> str:
    """What makes two tune specs the same study: the trials' settings and what is measured, not how
    many trials, workers or where they run."""
    identity = spec.model_dump(mode="json", include={"base", "space", "objective", "enqueue"})
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


__all__ = [
    "TornSafeJournal", "TuneError", "default_storage_path", "open_storage", "read_tune_file", "spec_digest",
    "stored_spec", "study_dir", "write_tune_file",
]
