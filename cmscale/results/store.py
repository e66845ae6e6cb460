"""The results store: every run directory under a results root, mirrored into one DuckDB file.

Jobs never open the database. They write only into ``<root>/<sweep>/<run_id>/`` (see
:mod:`cmscale.rundir`), and :func:`ingest`, run by one process at a time, copies what is new into
``<root>/cmscale.duckdb``.

Why it is built this way:

* DuckDB allows one read-write process per file, and while it holds the file no other process can
  open it, not even read-only. So ingestion parses files with no connection open, then holds the
  write connection only for one transaction per batch, retrying with backoff while someone else
  holds the file. Ingests are also serialised by an advisory ``flock`` on
  ``<root>/.cmscale-ingest.lock``, so two concurrent ``cmscale results ingest`` cannot both read
  the same new bytes.
* Ingestion is incremental. The table ``ingest_files`` remembers, per file, the size, mtime and
  inode it had when last read and, for ``metrics.jsonl``, the byte offset consumed so far (only
  complete lines) with a fingerprint of the 4 KiB before that offset. An unchanged
  (size, mtime, inode) means the file is not even opened. A grown file is read from the offset.
  A torn last line (a job killed mid-write, or a write in flight) is left for the next ingest.
* On resume the trainer rewrites ``metrics.jsonl`` without the rows after the checkpoint step
  (atomic replace: new inode, possibly shorter, different bytes before the offset). Any of these
  signs makes the store re-read the whole file and replace that run's rows, so the database
  mirrors the file and never holds a step twice.
* A run's identity is (sweep, run_id), its folder ``<root>/<sweep>/<run_id>``: the same run id in
  two sweeps (identical configs plan identical ids) names two runs. Keys: train (sweep, run_id,
  step), evals (sweep, run_id, step, sampler_steps, extractor), runs (sweep, run_id), sweeps
  (sweep), trials (study, trial_number). Rows are upserted, latest wins. All but train declare a
  PRIMARY KEY; train's is kept by ingestion alone (see the schema for why).
* A metrics row whose values cannot be converted is skipped alone and reported as an error with
  its file, byte offset and field (``cmscale results ingest --strict`` then exits 1); the rows
  around it are ingested.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl

from cmscale.rundir import CONFIG_FILE, DONE_FILE, METRICS_FILE, STATUS_FILE

log = logging.getLogger(__name__)

DB_FILE = "cmscale.duckdb"
INGEST_LOCK_FILE = ".cmscale-ingest.lock"
# Same names as cmscale.sweep.launch (not imported: that module pulls in submitit).
SWEEP_FILE = "sweep.json"
JOB_FILE = "job.json"
TRIAL_FILE = "trial.json"
RUN_JSON_FILES = (CONFIG_FILE, STATUS_FILE, DONE_FILE, JOB_FILE)
TRACKED_RUN_FILES = frozenset(RUN_JSON_FILES + (METRICS_FILE, TRIAL_FILE))
FINGERPRINT_BYTES = 4096
BATCH_BYTES = 256 << 20  # new metrics bytes parsed and written per transaction
DEFAULT_LOCK_TIMEOUT_S = float(os.environ.get("CMSCALE_DB_LOCK_TIMEOUT_S", "300"))

# Statement types refused up front with a clear message (the read-only connection would refuse
# them too, less clearly). COPY ... TO a file is allowed: it writes a file, not the database.
WRITE_STATEMENTS = frozenset({
    "INSERT", "UPDATE", "DELETE", "MERGE_INTO", "CREATE", "CREATE_FUNC", "DROP", "ALTER", "ATTACH",
    "DETACH", "VACUUM", "COPY_DATABASE",
})

METRIC_SCHEMA: dict[str, pl.DataType] = {
    "kind": pl.String,
    "step": pl.Int64,
    "images_seen": pl.Int64,
    "train_flops": pl.Float64,
    "loss": pl.Float64,
    "wall_s": pl.Float64,
    "sampler_steps": pl.Int64,
    "nfe": pl.Int64,
    "fid": pl.Float64,
    "num_samples": pl.Int64,
    "extractor": pl.String,
    "reference": pl.String,
    "sampling_flops_per_image": pl.Float64,
}
TRAIN_COLUMNS = ["sweep", "run_id", "step", "images_seen", "train_flops", "loss", "wall_s"]
EVAL_COLUMNS = [
    "sweep", "run_id", "step", "train_flops", "images_seen", "sampler_steps", "nfe", "fid", "num_samples",
    "extractor", "reference", "sampling_flops_per_image", "wall_s",
]
RUN_KEY = ["sweep", "run_id"]  # a run's identity, in every table and view
TRAIN_KEY = [*RUN_KEY, "step"]
EVAL_KEY = [*RUN_KEY, "step", "sampler_steps", "extractor"]

RUN_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "sweep": pl.String,
    "method": pl.String,
    "preset": pl.String,
    "params": pl.Int64,
    "dataset": pl.String,
    "resolution": pl.Int32,
    "batch_size": pl.Int32,
    "budget_flops": pl.Float64,
    "budget_iters": pl.Int64,
    "flops_per_step": pl.Float64,
    "flops_per_image_forward": pl.Float64,
    "seed": pl.Int32,
    "teacher_run_id": pl.String,
    "status": pl.String,
    "reason": pl.String,
    "host": pl.String,
    "slurm_job_id": pl.String,
    "git_commit": pl.String,
    "config_json": pl.String,
    "started": pl.Datetime("us"),
    "finished": pl.Datetime("us"),
    "final_step": pl.Int64,
    "train_flops": pl.Float64,
    "wall_s": pl.Float64,
    "img_channels": pl.Int32,
    "world_size": pl.Int32,
    "executor": pl.String,
    "attempt": pl.Int32,
    "status_updated": pl.Datetime("us"),
    "run_dir": pl.String,
    "ingested_at": pl.Datetime("us"),
}
SWEEP_SCHEMA: dict[str, pl.DataType] = {
    "sweep": pl.String, "spec_path": pl.String, "n_runs": pl.Int32, "ingested_at": pl.Datetime("us"),
}
TRIAL_SCHEMA: dict[str, pl.DataType] = {
    "study": pl.String, "trial_number": pl.Int32, "state": pl.String, "params_json": pl.String,
    "values_json": pl.String, "run_id": pl.String, "updated": pl.Datetime("us"), "attempt": pl.Int32,
    "reason": pl.String,
}
FILE_SCHEMA: dict[str, pl.DataType] = {
    "path": pl.String, "sweep": pl.String, "run_id": pl.String, "size": pl.Int64, "mtime_ns": pl.Int64, "inode": pl.Int64,
    "consumed": pl.Int64, "fingerprint": pl.String, "problem": pl.String, "ingested_at": pl.Datetime("us"),
}


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


class ReadOnlyQueryError(StoreError):
    """A query tried to modify the database; queries run on a read-only connection."""


# --------------------------------------------------------------------------- schema


def _migration_1(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""
        CREATE TABLE sweeps (
            sweep VARCHAR PRIMARY KEY, spec_path VARCHAR, n_runs INTEGER, ingested_at TIMESTAMP)""")
    con.execute("""
        CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY, sweep VARCHAR, method VARCHAR, preset VARCHAR, params BIGINT,
            dataset VARCHAR, resolution INTEGER, batch_size INTEGER, budget_flops DOUBLE,
            budget_iters BIGINT, flops_per_step DOUBLE, flops_per_image_forward DOUBLE, seed INTEGER,
            teacher_run_id VARCHAR, status VARCHAR, reason VARCHAR, host VARCHAR, slurm_job_id VARCHAR,
            git_commit VARCHAR, config_json JSON, started TIMESTAMP, finished TIMESTAMP,
            final_step BIGINT, train_flops DOUBLE, wall_s DOUBLE,
            img_channels INTEGER, world_size INTEGER, executor VARCHAR, attempt INTEGER,
            status_updated TIMESTAMP, run_dir VARCHAR, ingested_at TIMESTAMP)""")
    # train's key (run_id, step) is kept by ingestion (delete, then insert, in one transaction), not
    # declared: a PRIMARY KEY index makes the bulk insert about 4x slower (1.7 vs 0.4 CPU s per
    # million rows, benchmarks/bench_store.py), and ingestion is the only writer.
    con.execute("""
        CREATE TABLE train (
            run_id VARCHAR NOT NULL, step BIGINT NOT NULL, images_seen BIGINT, train_flops DOUBLE,
            loss DOUBLE, wall_s DOUBLE)""")
    con.execute("""
        CREATE TABLE evals (
            run_id VARCHAR NOT NULL, step BIGINT NOT NULL, train_flops DOUBLE, images_seen BIGINT,
            sampler_steps INTEGER NOT NULL, nfe INTEGER, fid DOUBLE, num_samples INTEGER,
            extractor VARCHAR NOT NULL, reference VARCHAR, sampling_flops_per_image DOUBLE,
            wall_s DOUBLE, PRIMARY KEY (run_id, step, sampler_steps, extractor))""")
    con.execute("""
        CREATE TABLE trials (
            study VARCHAR NOT NULL, trial_number INTEGER NOT NULL, state VARCHAR, params_json JSON,
            values_json JSON, run_id VARCHAR, updated TIMESTAMP, PRIMARY KEY (study, trial_number))""")
    con.execute("""
        CREATE TABLE ingest_files (
            path VARCHAR PRIMARY KEY, run_id VARCHAR, size BIGINT, mtime_ns BIGINT, inode BIGINT,
            consumed BIGINT, fingerprint VARCHAR, problem VARCHAR, ingested_at TIMESTAMP)""")
    # The last eval point of each run and sampler step count (all extractors at that step).
    con.execute("""
        CREATE VIEW latest_eval AS
        SELECT * FROM evals
        QUALIFY step = max(step) OVER (PARTITION BY run_id, sampler_steps)""")
    # One row per run: the runs columns, the final logged loss and the latest 1- and 2-step FID
    # (the alphabetically first extractor when several measured the same step).
    con.execute("""
        CREATE VIEW run_summary AS
        WITH last_train AS (
            SELECT run_id, arg_max(loss, step) AS final_loss, max(step) AS last_train_step,
                   count(*) AS n_train_rows
            FROM train GROUP BY run_id),
        last_fid AS (
            SELECT run_id,
                   first(fid ORDER BY extractor) FILTER (WHERE sampler_steps = 1) AS fid_1step,
                   first(fid ORDER BY extractor) FILTER (WHERE sampler_steps = 2) AS fid_2step,
                   min(extractor) AS fid_extractor,
                   max(step) AS last_eval_step,
                   max(train_flops) AS eval_train_flops
            FROM latest_eval GROUP BY run_id)
        SELECT runs.*, last_train.final_loss, last_train.last_train_step, last_train.n_train_rows,
               last_fid.fid_1step, last_fid.fid_2step, last_fid.fid_extractor,
               last_fid.last_eval_step, last_fid.eval_train_flops
        FROM runs
        LEFT JOIN last_train USING (run_id)
        LEFT JOIN last_fid USING (run_id)""")


def _migration_2(con: duckdb.DuckDBPyConnection) -> None:
    """Run identity (sweep, run_id) in every table, view and join; every attempt of a trial.

    Schema 1 keyed runs on run_id alone, so runs of two sweeps with the same id were merged and
    cannot be told apart any more. Everything in the store mirrors the run folders, so the tables
    are created anew and emptied, with the ingest bookkeeping: the ingest that follows every
    migration re-reads each file and rebuilds the rows from the folders, each under its sweep."""
    for view in ("run_summary", "latest_eval"):
        con.execute(f"DROP VIEW IF EXISTS {view}")
    for table in ("runs", "train", "evals", "trials", "ingest_files"):
        con.execute(f"DROP TABLE IF EXISTS {table}")
    con.execute("""
        CREATE TABLE runs (
            sweep VARCHAR NOT NULL, run_id VARCHAR NOT NULL, method VARCHAR, preset VARCHAR, params BIGINT,
            dataset VARCHAR, resolution INTEGER, batch_size INTEGER, budget_flops DOUBLE,
            budget_iters BIGINT, flops_per_step DOUBLE, flops_per_image_forward DOUBLE, seed INTEGER,
            teacher_run_id VARCHAR, status VARCHAR, reason VARCHAR, host VARCHAR, slurm_job_id VARCHAR,
            git_commit VARCHAR, config_json JSON, started TIMESTAMP, finished TIMESTAMP,
            final_step BIGINT, train_flops DOUBLE, wall_s DOUBLE,
            img_channels INTEGER, world_size INTEGER, executor VARCHAR, attempt INTEGER,
            status_updated TIMESTAMP, run_dir VARCHAR, ingested_at TIMESTAMP, PRIMARY KEY (sweep, run_id))""")
    # train's key (sweep, run_id, step) is kept by ingestion, not declared (see migration 1 for why).
    con.execute("""
        CREATE TABLE train (
            sweep VARCHAR NOT NULL, run_id VARCHAR NOT NULL, step BIGINT NOT NULL, images_seen BIGINT,
            train_flops DOUBLE, loss DOUBLE, wall_s DOUBLE)""")
    con.execute("""
        CREATE TABLE evals (
            sweep VARCHAR NOT NULL, run_id VARCHAR NOT NULL, step BIGINT NOT NULL, train_flops DOUBLE,
            images_seen BIGINT, sampler_steps INTEGER NOT NULL, nfe INTEGER, fid DOUBLE, num_samples INTEGER,
            extractor VARCHAR NOT NULL, reference VARCHAR, sampling_flops_per_image DOUBLE,
            wall_s DOUBLE, PRIMARY KEY (sweep, run_id, step, sampler_steps, extractor))""")
    # One row per attempt: a retried trial has a new trial number and keeps the failed one.
    con.execute("""
        CREATE TABLE trials (
            study VARCHAR NOT NULL, trial_number INTEGER NOT NULL, state VARCHAR, params_json JSON,
            values_json JSON, run_id VARCHAR, updated TIMESTAMP, attempt INTEGER, reason VARCHAR,
            PRIMARY KEY (study, trial_number))""")
    con.execute("""
        CREATE TABLE ingest_files (
            path VARCHAR PRIMARY KEY, sweep VARCHAR, run_id VARCHAR, size BIGINT, mtime_ns BIGINT, inode BIGINT,
            consumed BIGINT, fingerprint VARCHAR, problem VARCHAR, ingested_at TIMESTAMP)""")
    con.execute("DELETE FROM sweeps")
    con.execute("""
        CREATE VIEW latest_eval AS
        SELECT * FROM evals
        QUALIFY step = max(step) OVER (PARTITION BY sweep, run_id, sampler_steps)""")
    con.execute("""
        CREATE VIEW run_summary AS
        WITH last_train AS (
            SELECT sweep, run_id, arg_max(loss, step) AS final_loss, max(step) AS last_train_step,
                   count(*) AS n_train_rows
            FROM train GROUP BY sweep, run_id),
        last_fid AS (
            SELECT sweep, run_id,
                   first(fid ORDER BY extractor) FILTER (WHERE sampler_steps = 1) AS fid_1step,
                   first(fid ORDER BY extractor) FILTER (WHERE sampler_steps = 2) AS fid_2step,
                   min(extractor) AS fid_extractor,
                   max(step) AS last_eval_step,
                   max(train_flops) AS eval_train_flops
            FROM latest_eval GROUP BY sweep, run_id)
        SELECT runs.*, last_train.final_loss, last_train.last_train_step, last_train.n_train_rows,
               last_fid.fid_1step, last_fid.fid_2step, last_fid.fid_extractor,
               last_fid.last_eval_step, last_fid.eval_train_flops
        FROM runs
        LEFT JOIN last_train USING (sweep, run_id)
        LEFT JOIN last_fid USING (sweep, run_id)""")


# (version, description, apply). Append new entries for schema changes; never edit old ones.
MIGRATIONS: list[tuple[int, str, Callable[[duckdb.DuckDBPyConnection], None]]] = [
    (1, "tables sweeps, runs, train, evals, trials, ingest_files; views latest_eval, run_summary", _migration_1),
    (2, "run identity (sweep, run_id) in every table and view; trials keep every attempt; rebuilt from the "
        "run folders by the next ingest", _migration_2),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version recorded in the database (0 for an empty database)."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchall()[0][0]
    if not exists:
        return 0
    return int(con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0])


def migrate(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Bring a read-write connection's database to :data:`SCHEMA_VERSION`; returns the versions applied."""
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {current}, newer than this cmscale understands "
            f"({SCHEMA_VERSION}); upgrade cmscale"
        )
    applied = []
    for version, description, apply in MIGRATIONS:
        if version <= current:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP)"
            )
            apply(con)
            con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [version, description, _now()])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


# --------------------------------------------------------------------------- connections


def default_root() -> Path:
    """``$CMSCALE_RESULTS``, else ``results``."""
    return Path(os.environ.get("CMSCALE_RESULTS", "results"))


def db_path(root: Path | str | None = None) -> Path:
    return Path(root if root is not None else default_root()) / DB_FILE


def _is_lock_conflict(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


def _open(
    path: Path, read_only: bool, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, report: IngestReport | None = None
) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting with exponential backoff (and jitter) while another process holds it."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
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
            if report is not None:
                report.lock_wait_s += pause
            delay = min(delay * 2, 0.5)


def _ensure_schema(path: Path, timeout_s: float) -> None:
    """Create or migrate the database file; opens read-write only when something must change."""
    if path.exists():
        con = _open(path, read_only=True, timeout_s=timeout_s)
        try:
            if schema_version(con) == SCHEMA_VERSION:
                return
        finally:
            con.close()
    con = _open(path, read_only=False, timeout_s=timeout_s)
    try:
        migrate(con)
    finally:
        con.close()


def _check_root(root: Path) -> Path:
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
    root = _check_root(Path(root) if root is not None else default_root())
    path = root / DB_FILE
    if not path.exists():
        _ensure_schema(path, timeout_s)
    con = _open(path, read_only=read_only, timeout_s=timeout_s)
    if schema_version(con) != SCHEMA_VERSION:
        if read_only:
            con.close()
            _ensure_schema(path, timeout_s)
            return _open(path, read_only=True, timeout_s=timeout_s)
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


def query(
    sql: str, root: Path | str | None = None, ingest: bool = True, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> pl.DataFrame:
    """Run ``sql`` on a read-only connection (after an incremental ingest) and return a polars DataFrame."""
    root = _check_root(Path(root) if root is not None else default_root())
    refuse_writes(sql)
    if ingest and os.access(root, os.W_OK):
        _ingest_first(root, timeout_s)
    elif ingest:
        log.warning("%s is not writable: querying the database as it is, without ingesting", root)
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


# --------------------------------------------------------------------------- ingest report


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

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    def error(self, path: Path | str, message: str) -> None:
        if any(p.path == str(path) and p.message == message for p in self.errors):
            return
        problem = FileProblem(str(path), message)
        self.errors.append(problem)
        log.warning(str(problem))


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class _Seen:
    """A file as ``stat`` saw it during the scan."""

    rel: str  # path relative to the root, the bookkeeping key
    path: str
    size: int
    mtime_ns: int
    inode: int


@dataclass
class _Known:
    """A file as the bookkeeping table remembers it."""

    size: int
    mtime_ns: int
    inode: int
    consumed: int
    fingerprint: str | None
    run_id: str | None
    problem: str | None  # why the file was rejected when last read (re-reported until it changes)

    def same_as(self, seen: _Seen) -> bool:
        return (self.size, self.mtime_ns, self.inode) == (seen.size, seen.mtime_ns, seen.inode)


@dataclass
class _RunDir:
    sweep: str
    run_id: str
    path: Path
    files: dict[str, _Seen]


def _visible_dirs(path: str) -> list[os.DirEntry]:
    # Names starting with "_" or "." are bookkeeping (submitit logs in <sweep>/_submitit, tmp files).
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    return sorted(
        (e for e in entries if e.name[0] not in "_." and e.is_dir(follow_symlinks=True)), key=lambda e: e.name
    )


def _stat(rel: str, path: str) -> _Seen | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return _Seen(rel, path, st.st_size, st.st_mtime_ns, st.st_ino)


def _scan(root: Path) -> tuple[dict[str, _Seen], list[_RunDir]]:
    """stat() every tracked file under ``root`` (plain strings: this is the whole no-op ingest)."""
    sweep_files: dict[str, _Seen] = {}
    runs: list[_RunDir] = []
    for sweep_entry in _visible_dirs(str(root)):
        sweep = sweep_entry.name
        seen = _stat(f"{sweep}/{SWEEP_FILE}", os.path.join(sweep_entry.path, SWEEP_FILE))
        if seen is not None:
            sweep_files[sweep] = seen
        for run_entry in _visible_dirs(sweep_entry.path):
            run_id = run_entry.name
            files = {}
            try:
                entries = [e for e in os.scandir(run_entry.path) if e.name in TRACKED_RUN_FILES]
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                files[entry.name] = _Seen(f"{sweep}/{run_id}/{entry.name}", entry.path, st.st_size, st.st_mtime_ns, st.st_ino)
            runs.append(_RunDir(sweep, run_id, Path(run_entry.path), files))
    return sweep_files, runs


def _fingerprint(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# --------------------------------------------------------------------------- metrics files


@dataclass
class _MetricsChunk:
    """New complete lines of one metrics.jsonl and the bookkeeping to store once they are written."""

    sweep: str
    run_id: str
    seen: _Seen
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


def _read_metrics(sweep: str, run_id: str, seen: _Seen, known: _Known | None) -> _MetricsChunk | None:
    try:
        handle = open(seen.path, "rb")
    except FileNotFoundError:
        return None  # removed since the scan; the next ingest sees what replaced it
    with handle:
        # The file may have been replaced (resume rewrite) since the scan: describe the one opened.
        st = os.fstat(handle.fileno())
        seen = _Seen(seen.rel, seen.path, st.st_size, st.st_mtime_ns, st.st_ino)
        reset = known is not None and (known.inode != seen.inode or seen.size < known.consumed)
        blob_start, blob = 0, b""
        if known is not None and not reset and known.consumed > 0:
            blob_start = max(0, known.consumed - FINGERPRINT_BYTES)
            handle.seek(blob_start)
            blob = handle.read(seen.size - blob_start)
            before = blob[: known.consumed - blob_start]
            if len(before) != known.consumed - blob_start or _fingerprint(before) != known.fingerprint:
                reset = True  # same inode, but the bytes already ingested changed
        if known is None or reset or known.consumed == 0:
            blob_start = 0
            handle.seek(0)
            blob = handle.read(seen.size)
    start = 0 if (known is None or reset) else known.consumed
    lo = start - blob_start
    hi = blob.rfind(b"\n", lo) + 1 or lo  # end of the last complete line
    consumed = start + hi - lo
    fingerprint = _fingerprint(blob[max(0, consumed - FINGERPRINT_BYTES) - blob_start : consumed - blob_start])
    return _MetricsChunk(sweep, run_id, seen, blob, lo, hi, start, consumed, fingerprint, reset, len(blob) - hi)


def _convert_value(value: Any, dtype: pl.DataType) -> Any:
    """``value`` as the column's type, or raise ValueError saying what was expected."""
    if value is None:
        return None
    if dtype == pl.String:
        if isinstance(value, str):
            return value
        raise ValueError("not a string")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    if dtype == pl.Int64:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        value = int(value)
        if not -(2**63) <= value < 2**63:
            raise ValueError("out of the 64-bit range")
        return value
    try:
        return float(value)
    except OverflowError:
        raise ValueError("too large for a 64-bit float") from None


def _parse_lines_slowly(chunk: _MetricsChunk, report: IngestReport) -> pl.DataFrame:
    """Row by row, for a chunk the fast reader rejected: a line that is not a JSON object, or a value
    of the wrong type, skips that row alone, reported as an error with its byte offset and field."""
    rows = []
    position = chunk.start
    for line in bytes(chunk.view).split(b"\n")[:-1]:
        offset = position
        position += len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # accepts NaN and Infinity, which json.dumps writes
        except ValueError as error:
            report.error(chunk.seen.path, f"byte {offset}: not a JSON line ({error}); row skipped")
            continue
        if not isinstance(row, dict):
            report.error(chunk.seen.path, f"byte {offset}: expected a JSON object, got {type(row).__name__}; row skipped")
            continue
        converted = {}
        for key, dtype in METRIC_SCHEMA.items():
            try:
                converted[key] = _convert_value(row.get(key), dtype)
            except ValueError as reason:
                shown = repr(row.get(key))
                report.error(chunk.seen.path, f"byte {offset}: field {key!r} is {shown[:80]}, {reason}; row skipped")
                break
        else:
            rows.append(converted)
    if not rows:
        return pl.DataFrame(schema=METRIC_SCHEMA)
    return pl.from_dicts(rows, schema=METRIC_SCHEMA)


def _with_identity(frame: pl.DataFrame, chunk: _MetricsChunk) -> pl.DataFrame:
    return frame.insert_column(0, pl.Series("run_id", [chunk.run_id] * frame.height, pl.String)).insert_column(
        0, pl.Series("sweep", [chunk.sweep] * frame.height, pl.String))


def _parse_chunks(chunks: list[_MetricsChunk], report: IngestReport) -> pl.DataFrame:
    """All chunks' rows with ``sweep`` and ``run_id`` columns, in file order (one fast parse when possible)."""
    chunks = [c for c in chunks if c.nbytes]
    if not chunks:
        return pl.DataFrame(schema={"sweep": pl.String, "run_id": pl.String, **METRIC_SCHEMA})
    counts = [c.count_lines() for c in chunks]
    try:
        frame = pl.read_ndjson(io.BytesIO(b"".join(c.view for c in chunks)), schema=METRIC_SCHEMA)
        if frame.height == sum(counts):  # blank lines would misalign run ids; then go file by file
            index = pl.Series(np.repeat(np.arange(len(chunks), dtype=np.uint32), counts))
            frame = frame.insert_column(0, pl.Series("run_id", [c.run_id for c in chunks], pl.String).gather(index))
            return frame.insert_column(0, pl.Series("sweep", [c.sweep for c in chunks], pl.String).gather(index))
    except Exception:  # noqa: BLE001 - polars rejects NaN/Infinity and malformed lines; go file by file
        pass
    frames = []
    for chunk in chunks:
        try:
            frame = pl.read_ndjson(io.BytesIO(bytes(chunk.view)), schema=METRIC_SCHEMA)
            if frame.height != chunk.count_lines():
                frame = _parse_lines_slowly(chunk, report)
        except Exception:  # noqa: BLE001
            frame = _parse_lines_slowly(chunk, report)
        frames.append(_with_identity(frame, chunk))
    return pl.concat(frames, how="vertical")


def _split_rows(frame: pl.DataFrame, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Train and eval rows, each deduplicated on its key (a later line wins)."""
    is_train, is_eval, has_step = pl.col("kind") == "train", pl.col("kind") == "eval", pl.col("step").is_not_null()
    missing = frame.lazy().filter((is_train | is_eval) & ~has_step).select("run_id").collect()
    if missing.height:
        report.warn(f"{missing.height} metrics rows without a step skipped (runs: {', '.join(sorted(set(missing['run_id'])))})")
    train = frame.lazy().filter(is_train & has_step).select(TRAIN_COLUMNS).collect()
    # Each run's rows are contiguous and its steps only grow, so a step that does not exceed the
    # previous one of the same run is the cheap sign of a duplicate; only then pay for unique().
    same_run = (pl.col("sweep") == pl.col("sweep").shift(1)) & (pl.col("run_id") == pl.col("run_id").shift(1))
    regress = same_run & (pl.col("step") <= pl.col("step").shift(1))
    if train.height and train.select(regress.any()).item():
        train = train.unique(subset=TRAIN_KEY, keep="last", maintain_order=True)
    evals = frame.lazy().filter(is_eval & has_step).collect()
    no_sampler = evals.filter(pl.col("sampler_steps").is_null())
    if no_sampler.height:
        report.warn(f"{no_sampler.height} eval rows without sampler_steps skipped")
    evals = (
        evals.filter(pl.col("sampler_steps").is_not_null())
        .with_columns(pl.col("extractor").fill_null(""))
        .select(EVAL_COLUMNS)
        .unique(subset=EVAL_KEY, keep="last", maintain_order=True)
    )
    return train, evals


# --------------------------------------------------------------------------- JSON files -> rows


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _timestamp(value: Any) -> datetime | None:
    """Epoch seconds or ISO 8601 text -> naive UTC datetime."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(float(value), UTC).replace(tzinfo=None)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed
    except (ValueError, OverflowError, OSError):
        return None
    return None


def _number(value: Any, kind: type) -> Any:
    if value is None or isinstance(value, bool):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _load_object(path: Path, report: IngestReport, name: str) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None with the problem reported under the file's path."""
    try:
        with open(path, "rb") as handle:
            obj = json.loads(handle.read())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as error:
        report.error(path, f"malformed {name}: {error}; fix or remove the file, then ingest again")
        return None
    if not isinstance(obj, dict):
        report.error(path, f"malformed {name}: expected a JSON object, got {type(obj).__name__}")
        return None
    return obj


def _run_row(
    sweep: str, run_id: str, run: _RunDir | None, planned: dict[str, Any] | None, report: IngestReport
) -> dict[str, Any]:
    """The ``runs`` row: config.json (else the sweep plan's config), done.json, status.json, job.json."""
    files = run.files if run else {}
    loaded = {name: _load_object(files[name].path, report, name) if name in files else None for name in RUN_JSON_FILES}
    config = loaded[CONFIG_FILE]
    if config is None and planned is not None:
        config = dict(planned.get("config") or {})
        config.setdefault("flops_per_step", planned.get("flops_per_step"))
        config.setdefault("budget_iters_resolved", planned.get("iterations"))
    config = config or {}
    done = loaded[DONE_FILE] or {}
    status = loaded[STATUS_FILE] or {}
    job = loaded[JOB_FILE] or {}

    flops_per_step = _number(config.get("flops_per_step"), float)
    budget_iters = _number(config.get("budget_iters_resolved") or config.get("budget_iters"), int)
    budget_flops = _number(config.get("budget_flops"), float)
    if budget_flops is None and budget_iters is not None and flops_per_step is not None:
        budget_flops = budget_iters * flops_per_step  # iteration budgets, in FLOPs for iso-FLOP plots
    slurm_job_id = status.get("slurm_job_id")
    if slurm_job_id is None and job.get("executor") == "slurm":
        slurm_job_id = job.get("job_id")
    return {
        "run_id": run_id,
        "sweep": sweep,
        "method": _text(config.get("method")),
        "preset": _text(config.get("preset")),
        "params": _number(config.get("params"), int),
        "dataset": _text(config.get("dataset")),
        "resolution": _number(config.get("resolution"), int),
        "batch_size": _number(config.get("batch_size"), int),
        "budget_flops": budget_flops,
        "budget_iters": budget_iters,
        "flops_per_step": flops_per_step,
        "flops_per_image_forward": _number(config.get("flops_per_image_forward"), float),
        "seed": _number(config.get("seed"), int),
        "teacher_run_id": _text(config.get("teacher_run_id")),
        "status": _text(done.get("status") or status.get("state") or "planned"),
        "reason": _text(done.get("reason") if done else status.get("reason")),
        "host": _text(status.get("host")),
        "slurm_job_id": _text(slurm_job_id),
        "git_commit": _text(config.get("git_commit")),
        "config_json": json.dumps(config, sort_keys=True) if config else None,
        "started": _timestamp(done.get("started") or status.get("started")),
        "finished": _timestamp(done.get("finished")),
        "final_step": _number(done.get("final_step"), int),
        "train_flops": _number(done.get("train_flops"), float),
        "wall_s": _number(done.get("wall_s"), float),
        "img_channels": _number(config.get("img_channels"), int),
        "world_size": _number(config.get("world_size"), int),
        "executor": _text(job.get("executor")),
        "attempt": _number(job.get("attempt"), int),
        "status_updated": _timestamp(status.get("updated")),
        "run_dir": str(run.path) if run else None,
        "ingested_at": _now(),
    }


def _trial_rows(path: Path, run_id: str, report: IngestReport) -> list[dict[str, Any]]:
    """One row per attempt in a trial.json: the current trial and each earlier (failed) attempt."""
    trial = _load_object(path, report, TRIAL_FILE)
    if trial is None:
        return []
    records = [trial] + [r for r in trial.get("earlier_attempts") or [] if isinstance(r, dict)]
    rows = []
    for record in records:
        study = record.get("study") or trial.get("study")
        number = _number(record.get("trial_number"), int)
        if study is None or number is None:
            report.error(path, "trial.json needs 'study' and 'trial_number' (in each earlier attempt too)")
            return []
        values = record.get("values")
        rows.append({
            "study": str(study),
            "trial_number": number,
            "state": _text(record.get("state")),
            "params_json": json.dumps(record.get("params") or {}, sort_keys=True),
            "values_json": None if values is None else json.dumps(values),
            "run_id": _text(record.get("run_id") or run_id),
            "updated": _timestamp(record.get("updated")),
            "attempt": _number(record.get("attempt"), int),
            "reason": _text(record.get("reason")),
        })
    return rows


# --------------------------------------------------------------------------- ingest


@contextmanager
def _ingest_lock(root: Path, timeout_s: float, report: IngestReport) -> Iterator[None]:
    """Serialise ingests of one root across processes (advisory; skipped where flock is unsupported)."""
    started = time.monotonic()
    try:
        handle = open(root / INGEST_LOCK_FILE, "a+")
    except OSError as error:
        report.warn(f"cannot create {root / INGEST_LOCK_FILE} ({error}); ingesting without the ingest lock")
        yield
        return
    with handle:
        delay = 0.005
        locked = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() - started > timeout_s:
                    raise StoreError(
                        f"another ingest of {root} has held {INGEST_LOCK_FILE} for {timeout_s:.0f} s; "
                        "wait for it or raise CMSCALE_DB_LOCK_TIMEOUT_S"
                    ) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                report.warn(f"flock unsupported on {root} ({error}); relying on the database's own checks")
                break
        report.lock_wait_s += time.monotonic() - started
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


KNOWN_COLUMNS = "path, size, mtime_ns, inode, consumed, fingerprint, run_id, problem"


def _read_known(path: Path, timeout_s: float, report: IngestReport) -> dict[str, _Known]:
    """The bookkeeping table, creating or migrating the database first (one read-only open when current)."""
    if path.exists():
        with _open(path, read_only=True, timeout_s=timeout_s, report=report) as con:
            if schema_version(con) == SCHEMA_VERSION:
                return {row[0]: _Known(*row[1:]) for row in con.execute(f"SELECT {KNOWN_COLUMNS} FROM ingest_files").fetchall()}
    with _open(path, read_only=False, timeout_s=timeout_s, report=report) as con:
        migrate(con)
        return {row[0]: _Known(*row[1:]) for row in con.execute(f"SELECT {KNOWN_COLUMNS} FROM ingest_files").fetchall()}


@dataclass
class _Batch:
    """One write transaction: metrics files to read, and rows from the small JSON files."""

    metrics: list[tuple[str, str, _Seen, _Known | None]] = field(default_factory=list)  # (sweep, run_id, file, bookkeeping)
    run_rows: list[dict[str, Any]] = field(default_factory=list)
    sweep_rows: list[dict[str, Any]] = field(default_factory=list)
    trial_rows: list[dict[str, Any]] = field(default_factory=list)
    json_files: list[tuple[_Seen, str | None, str | None, str | None]] = field(default_factory=list)  # (file, sweep, run_id, problem)
    vanished: list[str] = field(default_factory=list)  # bookkeeping paths whose files are gone
    vanished_metrics_runs: list[tuple[str, str]] = field(default_factory=list)  # (sweep, run_id)
    delete_runs: list[tuple[str, str]] = field(default_factory=list)  # (sweep, run_id)

    def has_json_work(self) -> bool:
        return any([self.run_rows, self.sweep_rows, self.trial_rows, self.json_files, self.vanished, self.delete_runs])


def ingest(
    root: Path | str | None = None, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, batch_bytes: int = BATCH_BYTES
) -> IngestReport:
    """Copy what is new under ``root`` into ``<root>/cmscale.duckdb``; idempotent and incremental.

    Returns an :class:`IngestReport`. Malformed JSON files are listed in ``report.errors`` with
    their paths (the other runs are still ingested); torn last lines in ``report.warnings``.
    """
    t0 = time.perf_counter()
    root = _check_root(Path(root) if root is not None else default_root())
    report = IngestReport(root=str(root))
    path = root / DB_FILE
    with _ingest_lock(root, timeout_s, report):
        known = _read_known(path, timeout_s, report)
        for batch in _plan(root, known, report, batch_bytes):
            _write_batch(path, batch, known, report, timeout_s)
    report.seconds = time.perf_counter() - t0
    return report


def _ingest_first(root: Path, timeout_s: float) -> IngestReport:
    return ingest(root, timeout_s=timeout_s)  # query()'s ``ingest`` flag shadows the function there


class _Plans:
    """sweep.json files, parsed on first use."""

    def __init__(self, files: dict[str, _Seen], report: IngestReport):
        self.files, self.report = files, report
        self.data: dict[str, dict[str, Any] | None] = {}
        self.runs: dict[str, dict[str, dict[str, Any]]] = {}

    def load(self, sweep: str) -> dict[str, Any] | None:
        if sweep not in self.data:
            seen = self.files.get(sweep)
            data = _load_object(seen.path, self.report, SWEEP_FILE) if seen else None
            entries = (data or {}).get("runs") or []
            self.data[sweep] = data
            self.runs[sweep] = {str(e["run_id"]): e for e in entries if isinstance(e, dict) and "run_id" in e}
        return self.data[sweep]

    def planned(self, sweep: str) -> dict[str, dict[str, Any]]:
        self.load(sweep)
        return self.runs[sweep]


def _plan(root: Path, known: dict[str, _Known], report: IngestReport, batch_bytes: int) -> list[_Batch]:
    """Compare the scan with the bookkeeping. Metrics files are grouped into batches of about
    ``batch_bytes`` new bytes; the JSON-derived rows ride with the last batch."""
    sweep_files, runs = _scan(root)
    plans = _Plans(sweep_files, report)
    final = _Batch()
    batches = [_Batch()]
    batch_size = 0
    present: set[str] = set()
    run_dirs = {(run.sweep, run.run_id): run for run in runs}
    changed_runs: set[tuple[str, str]] = set()

    def unchanged(seen: _Seen) -> bool:
        present.add(seen.rel)
        entry = known.get(seen.rel)
        if entry is None or not entry.same_as(seen):
            return False
        if entry.problem:  # still the same malformed file: say so again, without re-reading it
            report.error(seen.path, entry.problem)
        return True

    def problem_of(seen: _Seen) -> str | None:
        return next((p.message for p in report.errors if p.path == str(seen.path)), None)

    for sweep, seen in sweep_files.items():
        if unchanged(seen):
            continue
        data = plans.load(sweep)
        final.json_files.append((seen, sweep, None, problem_of(seen)))
        if data is None:
            continue
        planned = plans.planned(sweep)
        final.sweep_rows.append(
            {"sweep": sweep, "spec_path": _text(data.get("spec_path")), "n_runs": len(planned), "ingested_at": _now()}
        )
        changed_runs.update((sweep, run_id) for run_id in planned)  # planned runs are listed before they start

    for run in runs:
        for name, seen in run.files.items():
            if unchanged(seen):
                continue  # same size, mtime and inode: not even opened
            entry = known.get(seen.rel)
            if name == METRICS_FILE:
                if batch_size >= batch_bytes:
                    batches.append(_Batch())
                    batch_size = 0
                batches[-1].metrics.append((run.sweep, run.run_id, seen, entry))
                batch_size += seen.size - (entry.consumed if entry is not None and seen.size >= entry.consumed else 0)
            elif name in RUN_JSON_FILES:
                changed_runs.add((run.sweep, run.run_id))
            elif name == TRIAL_FILE:
                final.trial_rows.extend(_trial_rows(seen.path, run.run_id, report))
                final.json_files.append((seen, run.sweep, run.run_id, problem_of(seen)))

    for rel in known:
        if rel in present:
            continue
        final.vanished.append(rel)
        parts = rel.split("/")
        if len(parts) == 3 and parts[2] == METRICS_FILE:
            final.vanished_metrics_runs.append((parts[0], parts[1]))  # metrics.jsonl deleted: so are its rows
        elif len(parts) == 3 and parts[2] in RUN_JSON_FILES:
            changed_runs.add((parts[0], parts[1]))

    for sweep, run_id in sorted(changed_runs):
        run = run_dirs.get((sweep, run_id))
        planned = plans.planned(sweep).get(run_id)
        if run is None and planned is None:
            final.delete_runs.append((sweep, run_id))  # run directory removed and not in the sweep's plan
            continue
        final.run_rows.append(_run_row(sweep, run_id, run, planned, report))
        for name in RUN_JSON_FILES:
            if run is not None and name in run.files:
                seen = run.files[name]
                final.json_files.append((seen, sweep, run_id, problem_of(seen)))

    batches = [b for b in batches if b.metrics]
    if final.has_json_work():
        if batches:
            final.metrics = batches[-1].metrics
            batches[-1] = final
        else:
            batches.append(final)
    return batches


def _upsert(
    con: duckdb.DuckDBPyConnection, table: str, rows: pl.DataFrame | list[dict[str, Any]],
    schema: dict[str, pl.DataType] | None = None, key: list[str] | None = None,
) -> None:
    """Insert rows, replacing those with the same key. ``key`` given: the table declares no primary
    key, so rows with these keys are deleted first (same transaction)."""
    frame = pl.from_dicts(rows, schema=schema) if isinstance(rows, list) else rows
    if frame.height == 0:
        return
    columns = ", ".join(f'"{c}"' for c in frame.columns)
    con.register("_incoming", frame)
    try:
        if key:
            names = ", ".join(key)
            con.execute(f"DELETE FROM {table} WHERE ({names}) IN (SELECT {names} FROM _incoming)")
            con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _incoming")
        else:
            con.execute(f"INSERT OR REPLACE INTO {table} ({columns}) SELECT {columns} FROM _incoming")
    finally:
        con.unregister("_incoming")


def _read_batch(batch: _Batch, report: IngestReport) -> list[_MetricsChunk]:
    chunks = []
    for sweep, run_id, seen, entry in batch.metrics:
        chunk = _read_metrics(sweep, run_id, seen, entry)
        if chunk is None:
            continue
        if chunk.torn:
            report.torn_files.append(str(seen.path))
            report.warn(
                f"{seen.path}: incomplete last line ({chunk.torn} bytes) skipped; "
                "it is ingested once the line is complete"
            )
        if chunk.reset:
            report.reset_files.append(str(seen.path))
        chunks.append(chunk)
    return chunks


def _runs_frame(runs: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame({"sweep": [r[0] for r in runs], "run_id": [r[1] for r in runs]},
                        schema={"sweep": pl.String, "run_id": pl.String})


def _write_batch(path: Path, batch: _Batch, known: dict[str, _Known], report: IngestReport, timeout_s: float) -> None:
    chunks = _read_batch(batch, report)
    train, evals = _split_rows(_parse_chunks(chunks, report), report)
    now = _now()
    file_rows = [
        {"path": c.seen.rel, "sweep": c.sweep, "run_id": c.run_id, "size": c.seen.size, "mtime_ns": c.seen.mtime_ns,
         "inode": c.seen.inode, "consumed": c.consumed, "fingerprint": c.fingerprint, "problem": None,
         "ingested_at": now}
        for c in chunks
    ] + [
        {"path": s.rel, "sweep": sweep, "run_id": run_id, "size": s.size, "mtime_ns": s.mtime_ns, "inode": s.inode,
         "consumed": s.size, "fingerprint": None, "problem": problem, "ingested_at": now}
        for s, sweep, run_id, problem in batch.json_files
    ]
    reset_runs = sorted({(c.sweep, c.run_id) for c in chunks if c.reset} | set(batch.vanished_metrics_runs))

    con = _open(path, read_only=False, timeout_s=timeout_s, report=report)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            # Without flock (some network file systems) a concurrent ingest may have taken a file
            # since the bookkeeping was read: leave those files to the next ingest.
            touched = [row["path"] for row in file_rows] + batch.vanished
            if touched:
                con.register("_touched", pl.DataFrame({"path": touched}, schema={"path": pl.String}))
                current = {
                    row[0]: _Known(*row[1:])
                    for row in con.execute(
                        f"SELECT {KNOWN_COLUMNS} FROM ingest_files WHERE path IN (SELECT path FROM _touched)"
                    ).fetchall()
                }
                con.unregister("_touched")
                moved = {p for p in touched if current.get(p) != known.get(p)}
                if moved:
                    report.warn(f"{len(moved)} files were ingested meanwhile by another process; left to the next ingest")
                    skip = {(c.sweep, c.run_id) for c in chunks if c.seen.rel in moved}
                    skipped = _runs_frame(sorted(skip))
                    train = train.join(skipped, on=RUN_KEY, how="anti", maintain_order="left")
                    evals = evals.join(skipped, on=RUN_KEY, how="anti", maintain_order="left")
                    file_rows = [row for row in file_rows if row["path"] not in moved]
                    reset_runs = [r for r in reset_runs if r not in skip]
            if reset_runs:
                # The file was rewritten (resume) or removed: the run's rows become exactly the file's.
                con.register("_reset", _runs_frame(reset_runs))
                con.execute("DELETE FROM train WHERE (sweep, run_id) IN (SELECT sweep, run_id FROM _reset)")
                con.execute("DELETE FROM evals WHERE (sweep, run_id) IN (SELECT sweep, run_id FROM _reset)")
                con.unregister("_reset")
            _upsert(con, "train", train, key=TRAIN_KEY)
            _upsert(con, "evals", evals)
            _upsert(con, "runs", batch.run_rows, RUN_SCHEMA)
            _upsert(con, "sweeps", batch.sweep_rows, SWEEP_SCHEMA)
            _upsert(con, "trials", batch.trial_rows, TRIAL_SCHEMA)
            if batch.delete_runs:
                con.executemany("DELETE FROM runs WHERE sweep = ? AND run_id = ?", [list(r) for r in batch.delete_runs])
            if batch.vanished:
                con.executemany("DELETE FROM ingest_files WHERE path = ?", [[p] for p in batch.vanished])
            _upsert(con, "ingest_files", file_rows, FILE_SCHEMA)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    report.transactions += 1
    report.train_rows += train.height
    report.eval_rows += evals.height
    report.runs += len(batch.run_rows)
    report.sweeps += len(batch.sweep_rows)
    report.trials += len(batch.trial_rows)
    report.runs_deleted += len(batch.delete_runs)
    report.metrics_files_read += len(chunks)
    report.bytes_parsed += sum(c.nbytes for c in chunks)
