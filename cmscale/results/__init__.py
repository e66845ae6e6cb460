"""cmscale.results: the DuckDB results store (ingest run directories, query with SQL, export).

- :mod:`cmscale.results.schema`: tables, views, column types and migrations.
- :mod:`cmscale.results.db`: connections (back-off while the file is held, read-only queries).
- :mod:`cmscale.results.files`: a run folder's files as scanned and remembered; the new lines of ``metrics.jsonl``.
- :mod:`cmscale.results.lines`: JSON lines -> a typed frame (bad lines skipped and reported).
- :mod:`cmscale.results.rows`: that frame and the run's JSON files -> train, eval, runs and trials rows.
- :mod:`cmscale.results.ingest_report`: what an ingest did and each problem with its file.
- :mod:`cmscale.results.ingest`: scanning a results root and the locked, batched, incremental ingest.

:func:`query` is the one entry that does both: an incremental ingest, then a read-only query.
The commands (``cmscale results ...``) live in :mod:`cmscale.cli.results`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import polars as pl

from cmscale.results.db import (
    DEFAULT_LOCK_TIMEOUT_S,
    DEFAULT_QUERY_TIMEOUT_S,
    QueryInterrupted,
    check_root,
    connect,
    db_path,
    default_root,
    read_query,
    refuse_writes,
)
from cmscale.results.ingest import ingest
from cmscale.results.ingest_report import IngestReport
from cmscale.results.schema import SCHEMA_VERSION, ReadOnlyQueryError, StoreError, migrate
from cmscale.rundir import DB_FILE

log = logging.getLogger(__name__)


def query(sql: str, root: Path | str | None = None, ingest_first: bool = True,
          timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
          query_timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S) -> pl.DataFrame:
    """Run ``sql`` on a read-only connection and return a polars DataFrame; with ``ingest_first``
    (the default) new rows are ingested before, unless the root is not writable."""
    root = check_root(Path(root) if root is not None else default_root())
    refuse_writes(sql)
    if ingest_first and os.access(root, os.W_OK):
        ingest(root, timeout_s=timeout_s)
    elif ingest_first:
        log.warning("%s is not writable: querying the database as it is, without ingesting", root)
    return read_query(sql, root, timeout_s=timeout_s, query_timeout_s=query_timeout_s)


__all__ = [
    "DB_FILE",
    "SCHEMA_VERSION",
    "IngestReport",
    "QueryInterrupted",
    "ReadOnlyQueryError",
    "StoreError",
    "connect",
    "db_path",
    "default_root",
    "ingest",
    "migrate",
    "query",
    "read_query",
    "refuse_writes",
]
