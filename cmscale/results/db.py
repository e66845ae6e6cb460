"""Connections to the store: open with back-off while another process holds the file, create or
migrate the schema on first use, and run read-only queries.

DuckDB allows one read-write process per file, and while it holds the file no other process can
open it, not even read-only. So every open retries with exponential backoff (and jitter) until
``CMSCALE_DB_LOCK_TIMEOUT_S``, and queries run on read-only connections that refuse writes.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import polars as pl

from cmscale.config import default_results_root
from cmscale.results.schema import (
    SCHEMA_VERSION,
    ReadOnlyQueryError,
    StoreError,
    migrate,
    schema_version,
)
from cmscale.rundir import DB_FILE

DEFAULT_LOCK_TIMEOUT_S = float(os.environ.get("CMSCALE_DB_LOCK_TIMEOUT_S", "300"))

# The storage format a new store is written in: DuckDB 1.4 (LTS) and newer read it, among them the
# DuckDB CLI on PyPI (duckdb-cli 1.5.6), which refuses DuckDB 2.0's default format. The setting
# acts when a file is created; an existing file keeps the format it has. Every connection passes
# the same setting (DuckDB refuses a second connection to a file with a different configuration).
STORAGE_VERSION = "v1.4.0"
DUCKDB_CONFIG = {"storage_compatibility_version": STORAGE_VERSION}

# Statement types refused up front with a clear message (the read-only connection would refuse
# them too, less clearly). COPY ... TO a file is allowed: it writes a file, not the database.
WRITE_STATEMENTS = frozenset({
    "INSERT", "UPDATE", "DELETE", "MERGE_INTO", "CREATE", "CREATE_FUNC", "DROP", "ALTER", "ATTACH",
    "DETACH", "VACUUM", "COPY_DATABASE",
})

default_root = default_results_root  # ``$CMSCALE_RESULTS``, else ``results`` (kept as the store's name for it)


def db_path(root: Path | str | None = None) -> Path:
    return Path(root if root is not None else default_root()) / DB_FILE


def _is_lock_conflict(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


def open_db(
    path: Path,
    read_only: bool,
    timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    on_wait: Callable[[float], None] | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting with exponential backoff (and jitter) while another process holds it.

    ``on_wait(seconds)`` is told of each pause (the ingest report adds them up)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=DUCKDB_CONFIG)
        except duckdb.IOException as error:
            if not _is_lock_conflict(error) or time.monotonic() > deadline:
                if _is_lock_conflict(error):
                    raise StoreError(
                        f"{path} stayed locked by another process for {timeout_s:.0f} s ({error}). "
                        "Close long-lived connections (for example a notebook holding "
                        "cmscale.results.connect()) or raise CMSCALE_DB_LOCK_TIMEOUT_S."
                    ) from None
                raise
            pause = delay * (0.5 + random.random())
            time.sleep(pause)
            if on_wait is not None:
                on_wait(pause)
            delay = min(delay * 2, 0.5)


def ensure_schema(path: Path, timeout_s: float) -> None:
    """Create or migrate the database file; opens read-write only when something must change."""
    if path.exists():
        con = open_db(path, read_only=True, timeout_s=timeout_s)
        try:
            if schema_version(con) == SCHEMA_VERSION:
                return
        finally:
            con.close()
    con = open_db(path, read_only=False, timeout_s=timeout_s)
    try:
        migrate(con)
    finally:
        con.close()


def check_root(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise StoreError(
            f"results root {root} does not exist; pass --root (or set CMSCALE_RESULTS) to the folder "
            "that holds <sweep>/<run_id>/ run directories"
        )
    return root


def connect(
    root: Path | str | None = None, read_only: bool = True, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to ``<root>/cmscale.duckdb`` (created and migrated if needed).

    Close it soon (or use it in a ``with`` block): while any process holds the file, ingestion
    waits. Does not ingest; call :func:`ingest` first or use :func:`query`.
    """
    root = check_root(Path(root) if root is not None else default_root())
    path = root / DB_FILE
    if not path.exists():
        ensure_schema(path, timeout_s)
    con = open_db(path, read_only=read_only, timeout_s=timeout_s)
    if schema_version(con) != SCHEMA_VERSION:
        if read_only:
            con.close()
            ensure_schema(path, timeout_s)
            return open_db(path, read_only=True, timeout_s=timeout_s)
        migrate(con)
    return con


def refuse_writes(sql: str) -> None:
    """Raise :class:`ReadOnlyQueryError` if ``sql`` holds a statement that would modify the database."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return  # let the query itself report the syntax error
    for statement in statements:
        kind = statement.type.name
        if kind in WRITE_STATEMENTS:
            raise ReadOnlyQueryError(
                f"refused: {kind} statement ({statement.query.strip()[:80]!r}). `cmscale results query` "
                "runs on a read-only connection; the database is written only by "
                "`cmscale results ingest` from the run directories. Change the files, then ingest."
            )


def read_query(sql: str, root: Path | str | None = None, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> pl.DataFrame:
    """Run ``sql`` on a read-only connection (no ingest) and return a polars DataFrame."""
    root = check_root(Path(root) if root is not None else default_root())
    refuse_writes(sql)
    with connect(root, read_only=True, timeout_s=timeout_s) as con:
        try:
            relation = con.sql(sql)
        except duckdb.InvalidInputException as error:
            if "read-only" in str(error):
                raise ReadOnlyQueryError(f"refused: {error}") from None
            raise
        if relation is None:
            return pl.DataFrame()
        return relation.pl()
