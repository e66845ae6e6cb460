"""A run folder's files as the scan sees them (:class:`Seen`) and as the bookkeeping remembers them
(:class:`Known`), and the incremental read of the new complete lines of a ``metrics.jsonl``.

Ingestion is incremental: the bookkeeping remembers, per file, the size, mtime and inode it had
when last read and, for ``metrics.jsonl``, the byte offset consumed so far (only complete lines)
with a fingerprint of the 4 KiB before that offset. A grown file is read from the offset. A torn
last line (a job killed mid-write, or a write in flight) is left for the next ingest. On resume the
trainer rewrites ``metrics.jsonl`` without the rows after the checkpoint step (atomic replace: new
inode, possibly shorter, different bytes before the offset); any of these signs makes
:func:`read_new_lines` re-read the whole file and mark the chunk ``reset``, so the database mirrors
the file and never holds a step twice.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

FINGERPRINT_BYTES = 4096


@dataclass(frozen=True)
class Seen:
    """A file as ``stat`` saw it during the scan."""

    rel: str  # path relative to the root, the bookkeeping key
    path: str
    size: int
    mtime_ns: int
    inode: int


@dataclass
class Known:
    """A file as the bookkeeping table remembers it."""

    size: int
    mtime_ns: int
    inode: int
    consumed: int
    fingerprint: str | None
    run_id: str | None
    problem: str | None  # why the file was rejected when last read (re-reported until it changes)

    def same_as(self, seen: Seen) -> bool:
        return (self.size, self.mtime_ns, self.inode) == (seen.size, seen.mtime_ns, seen.inode)


@dataclass
class RunFiles:
    sweep: str
    run_id: str
    path: Path
    files: dict[str, Seen]



def digest_of(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class MetricsChunk:
    """New complete lines of one metrics.jsonl and the bookkeeping to store once they are written."""

    sweep: str
    run_id: str
    seen: Seen
    blob: bytes  # what was read; the new complete lines are blob[lo:hi] (kept unsliced: no copies)
    lo: int
    hi: int
    start: int  # byte offset of blob[lo] in the file
    consumed: int
    fingerprint: str
    reset: bool  # the file was rewritten: replace all of the run's rows with the file's
    torn: int  # bytes of an incomplete last line left for later

    @property
    def nbytes(self) -> int:
        return self.hi - self.lo

    @property
    def view(self) -> memoryview:
        return memoryview(self.blob)[self.lo : self.hi]

    def count_lines(self) -> int:
        return self.blob.count(b"\n", self.lo, self.hi)


def read_new_lines(sweep: str, run_id: str, seen: Seen, known: Known | None) -> MetricsChunk | None:
    try:
        handle = open(seen.path, "rb")
    except FileNotFoundError:
        return None  # removed since the scan; the next ingest sees what replaced it
    with handle:
        # The file may have been replaced (resume rewrite) since the scan: describe the one opened.
        st = os.fstat(handle.fileno())
        seen = Seen(seen.rel, seen.path, st.st_size, st.st_mtime_ns, st.st_ino)
        reset = known is not None and (known.inode != seen.inode or seen.size < known.consumed)
        blob_start, blob = 0, b""
        if known is not None and not reset and known.consumed > 0:
            blob_start = max(0, known.consumed - FINGERPRINT_BYTES)
            handle.seek(blob_start)
            blob = handle.read(seen.size - blob_start)
            before = blob[: known.consumed - blob_start]
            if len(before) != known.consumed - blob_start or digest_of(before) != known.fingerprint:
                reset = True  # same inode, but the bytes already ingested changed
        if known is None or reset or known.consumed == 0:
            blob_start = 0
            handle.seek(0)
            blob = handle.read(seen.size)
    start = 0 if (known is None or reset) else known.consumed
    lo = start - blob_start
    hi = blob.rfind(b"\n", lo) + 1 or lo  # end of the last complete line
    consumed = start + hi - lo
    fingerprint = digest_of(blob[max(0, consumed - FINGERPRINT_BYTES) - blob_start : consumed - blob_start])
    return MetricsChunk(sweep, run_id, seen, blob, lo, hi, start, consumed, fingerprint, reset, len(blob) - hi)
