"""Connections to the store: open with back-off while another process holds the file, create or
migrate the schema on first use, and run read-only queries.

DuckDB allows one read-write process per file, and while it holds the file no other process can
open it, not even read-only. So every open retries with exponential backoff (and jitter) until
``CMSCALE_DB_LOCK_TIMEOUT_S``.

User SQL runs in DuckDB's own sandbox (:data:`SANDBOX`): a read-only connection with external
access off (no file is read or written, no extension installed or loaded, nothing fetched) and
the configuration locked, so no statement can turn it back on. A query that runs past its time
limit, or is stopped with Ctrl-C, is interrupted on its connection (the process lives on).
"""

from __future__ import annotations

import os
import random
import threading
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
DEFAULT_QUERY_TIMEOUT_S = 300.0  # a user query's time limit (``cmscale results query --timeout``)

# The storage format a new store is written in: DuckDB 1.4 (LTS) and newer read it, among them the
# DuckDB CLI on PyPI (duckdb-cli 1.5.6), which refuses DuckDB 2.0's default format. The setting
# acts when a file is created; an existing file keeps the format it has. Every connection passes
# the same setting (DuckDB refuses a second connection to a file with a different configuration).
STORAGE_VERSION = "v1.4.0"
DUCKDB_CONFIG = {"storage_compatibility_version": STORAGE_VERSION}

# Statement types refused up front with a clear message (the sandbox would refuse them too, less
# clearly): writes to the database, and anything that reaches files, extensions or settings.
WRITE_STATEMENTS = frozenset({
    "INSERT", "UPDATE", "DELETE", "MERGE_INTO", "CREATE", "CREATE_FUNC", "DROP", "ALTER", "ATTACH",
    "DETACH", "VACUUM", "COPY_DATABASE", "COPY", "EXPORT", "LOAD", "EXTENSION", "UPDATE_EXTENSIONS",
    "SET", "VARIABLE_SET",
})
# DuckDB's sandbox for user SQL, set when the connection opens; the configuration is then locked.
SANDBOX = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}

default_root = default_results_root  # ``$CMSCALE_RESULTS``, else ``results`` (kept as the store's name for it)


def db_path(root: Path | str | None = None) -> Path:
    return Path(root if root is not None else default_root()) / DB_FILE


def _is_lock_conflict(error: duckdb.Error) -> bool:
    return isinstance(error, duckdb.IOException) and "lock" in str(error).lower()


def unusable_store(path: Path, error: BaseException) -> StoreError:
    """The one message for a store file that cannot be read or written: what failed and the fix."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, OSError) and error.errno is not None:
        reason = os.strerror(error.errno)
    lowered = reason.lower()
    if "different configuration" in lowered:
        return StoreError(f"{path}: a connection this process holds on the store (cmscale.results.connect()) "
                          "stops the sandboxed query connection from opening; close it first")
    if "no space left" in lowered or "disk full" in lowered:
        fix = "free space on that file system, then run `cmscale results ingest` again (the run folders keep every row)"
    elif "read-only" in lowered or "permission" in lowered:
        fix = ("the results root is not writable: ingest where it is writable, or query the store as it is with "
               "`cmscale results query --no-ingest`")
    else:
        fix = (f"the store only mirrors the run folders: move it aside (mv {path} {path}.bad) and run "
               "`cmscale results ingest` to rebuild it")
    return StoreError(f"{path}: cannot use the results store ({reason}); {fix}")


def open_db(
    path: Path,
    read_only: bool,
    timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    on_wait: Callable[[float], None] | None = None,
    config: dict | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting with exponential backoff (and jitter) while another process holds it.

    ``on_wait(seconds)`` is told of each pause (the ingest report adds them up). A file DuckDB
    cannot open (empty, truncated, corrupt, on a read-only file system) raises a StoreError
    naming it and the fix."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=DUCKDB_CONFIG | (config or {}))
        except duckdb.Error as error:
            if not _is_lock_conflict(error) or time.monotonic() > deadline:
                if _is_lock_conflict(error):
                    raise StoreError(
                        f"{path} stayed locked by another process for {timeout_s:.0f} s ({error}). "
                        "Close long-lived connections (for example a notebook holding "
                        "cmscale.results.connect()) or raise CMSCALE_DB_LOCK_TIMEOUT_S."
                    ) from None
                raise unusable_store(path, error) from None
            pause = delay * (0.5 + random.random())
            time.sleep(pause)
            if on_wait is not None:
                on_wait(pause)
            delay = min(delay * 2, 0.5)


def check_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The store's schema version; a store newer than this cmscale raises a StoreError naming it."""
    try:
        version = schema_version(con)
    except duckdb.Error as error:
        raise unusable_store(path, error) from None
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: the store has schema version {version}, newer than this cmscale understands "
            f"({SCHEMA_VERSION}); upgrade cmscale, or move the store aside (mv {path} {path}.new) and run "
            "`cmscale results ingest` to build one this version reads"
        )
    return version


def ensure_schema(path: Path, timeout_s: float) -> None:
    """Create or migrate the database file; opens read-write only when something must change."""
    if path.exists():
        con = open_db(path, read_only=True, timeout_s=timeout_s)
        try:
            if check_version(con, path) == SCHEMA_VERSION:
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
    try:
        version = check_version(con, path)
    except StoreError:
        con.close()
        raise
    if version != SCHEMA_VERSION:
        if read_only:
            con.close()
            ensure_schema(path, timeout_s)
            return open_db(path, read_only=True, timeout_s=timeout_s)
        migrate(con)
    return con


def refuse_writes(sql: str) -> None:
    """Raise :class:`ReadOnlyQueryError` if ``sql`` holds a statement that would modify the database
    or reach outside it (files, extensions, settings)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return  # let the query itself report the syntax error
    for statement in statements:
        try:
            kind = statement.type.name
        except ValueError:  # a statement type this duckdb's Python enum lacks: the sandbox decides
            continue
        if kind in WRITE_STATEMENTS:
            raise ReadOnlyQueryError(
                f"refused: {kind} statement ({statement.query.strip()[:80]!r}). `cmscale results query` "
                "runs on a read-only, sandboxed connection: it neither writes the database nor reads or writes "
                "files, extensions or settings; the database is written only by `cmscale results ingest` from the "
                "run directories. "
                "To save a result, use --format csv/json/parquet with --out FILE."
            )


class QueryInterrupted(StoreError):
    """A query ran past its time limit or was stopped with Ctrl-C; its connection was interrupted."""


def read_query(
    sql: str,
    root: Path | str | None = None,
    timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    query_timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S,
) -> pl.DataFrame:
    """Run ``sql`` in the sandbox (no ingest) and return a polars DataFrame.

    ``timeout_s`` bounds the wait for the file; ``query_timeout_s`` the query itself (None: no
    limit). The query runs on a worker thread so that the time limit and Ctrl-C can interrupt it
    through :meth:`duckdb.DuckDBPyConnection.interrupt`; the process is never killed."""
    root = check_root(Path(root) if root is not None else default_root())
    refuse_writes(sql)
    path = root / DB_FILE
    connect(root, read_only=True, timeout_s=timeout_s).close()  # create or migrate the store first
    con = open_db(path, read_only=True, timeout_s=timeout_s, config=SANDBOX)
    con.execute("SET enable_progress_bar = false")  # the query's own progress bar would garble the output
    con.execute("SET lock_configuration = true")  # no statement can lift the sandbox
    outcome: dict[str, object] = {}
    finished = threading.Event()  # not Thread.join: a join interrupted by Ctrl-C may return early later

    def work() -> None:
        try:
            relation = con.sql(sql)
            outcome["frame"] = pl.DataFrame() if relation is None else relation.pl()
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = error
        finally:
            finished.set()

    started = time.monotonic()
    why = None
    try:
        threading.Thread(target=work, name="cmscale-query", daemon=True).start()
        while not finished.is_set():
            remaining = None if query_timeout_s is None else query_timeout_s - (time.monotonic() - started)
            if remaining is not None and remaining <= 0:
                why = f"ran past its time limit of {query_timeout_s:g} s; raise it with --timeout SECONDS"
                con.interrupt()
                break
            finished.wait(0.1 if remaining is None else min(0.1, remaining))
    except KeyboardInterrupt:
        why = "stopped by Ctrl-C"
        con.interrupt()
    finally:
        finished.wait()
        con.close()
    error = outcome.get("error")
    if why is not None and (error is None or isinstance(error, duckdb.InterruptException)):
        raise QueryInterrupted(f"query {why} (after {time.monotonic() - started:.1f} s); nothing was changed")
    if isinstance(error, duckdb.PermissionException):
        raise ReadOnlyQueryError(
            f"refused: {str(error).splitlines()[0]}. `cmscale results query` runs in DuckDB's sandbox: it reads "
            "only the store's tables, never files, extensions or the network"
        ) from None
    if isinstance(error, duckdb.InvalidInputException) and (
        "read-only" in str(error) or "configuration has been locked" in str(error)
    ):
        raise ReadOnlyQueryError(f"refused: {error}") from None
    if error is not None:
        raise error  # type: ignore[misc]
    return outcome["frame"]  # type: ignore[return-value]
