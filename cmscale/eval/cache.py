"""The on-disk cache shared by every run and job: extractor weights and reference statistics.

Location: ``$CMSCALE_CACHE_DIR``, default ``~/.cache/cmscale``. On a cluster, point it at a
shared file system so that every job reuses one copy.

Concurrency: writers take an exclusive ``flock`` on ``<file>.lock`` and check the cache again
inside the lock, so when many jobs start at once one computes and the others wait and then read.
Files are also written to a temporary name and renamed, so a reader never sees half a file even
where ``flock`` is not honoured (some network file systems).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cmscale.config import CACHE_ENV, cache_root

__all__ = ["CACHE_ENV", "cache_root", "locked"]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock tied to ``path`` (released by the kernel if the process dies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
