"""Ingest: copy what is new under a results root into ``<root>/cmscale.duckdb``.

Jobs never open the database. They write only into ``<root>/<sweep>/<run_id>/`` (see
:mod:`cmscale.rundir`), and :func:`ingest`, run by one process at a time, copies what is new.

* Ingests are serialised by an advisory ``flock`` on ``<root>/.cmscale-ingest.lock``, so two
  concurrent ``cmscale results ingest`` cannot both read the same new bytes.
* Files are read (:mod:`~cmscale.results.files`) and parsed (:mod:`~cmscale.results.lines`,
  :mod:`~cmscale.results.rows`) with no connection open; the write connection is
  held only for one transaction per batch of about ``BATCH_BYTES`` new bytes, retrying with
  backoff while someone else holds the file (:mod:`cmscale.results.db`).
* An unchanged (size, mtime, inode) means a file is not even opened, so a no-op ingest costs one
  ``stat`` per tracked file.
* A run is (sweep, run_id), its folder: every bookkeeping row, reset and deletion names both, so
  the same run id in two sweeps stays two runs.
* One run never blocks a root: a run whose files cannot become a row (a value its column cannot
  hold, a malformed file) is reported with its path, and the other runs land.
* A metrics row that cannot be converted is skipped alone and reported as an error with its file,
  byte offset and field (``cmscale results ingest --strict`` then exits 1); its neighbours are
  ingested and the offset moves past it, so it is reported once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from cmscale.results.db import (
    DEFAULT_LOCK_TIMEOUT_S,
    check_root,
    check_version,
    default_root,
    open_db,
    unusable_store,
)
from cmscale.results.files import Known, MetricsChunk, RunFiles, Seen, read_new_lines
from cmscale.results.ingest_report import IngestReport
from cmscale.results.lines import parse_chunks
from cmscale.results.rows import (
    RUN_JSON_FILES,
    evaluated_ema_sigma_rel,
    fit_integers,
    load_object,
    run_row,
    split_rows,
    text,
    trial_rows,
)
from cmscale.results.schema import (
    EVAL_KEY,
    FILE_SCHEMA,
    RUN_KEY,
    RUN_SCHEMA,
    SCHEMA_VERSION,
    SWEEP_SCHEMA,
    TRAIN_KEY,
    TRIAL_SCHEMA,
    StoreError,
    migrate,
    now,
    rollback,
)
from cmscale.rundir import DB_FILE, INGEST_LOCK_FILE, METRICS_FILE, SWEEP_FILE, TRIAL_FILE

TRACKED_RUN_FILES = frozenset(RUN_JSON_FILES + (METRICS_FILE, TRIAL_FILE))
BATCH_BYTES = 256 << 20  # new metrics bytes parsed and written per transaction


# --------------------------------------------------------------------------- scanning


def _visible_dirs(path: str) -> list[os.DirEntry]:
    # Names starting with "_" or "." are bookkeeping (submitit logs in <sweep>/_submitit, tmp files).
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return []
    return sorted(
        (e for e in entries if e.name[0] not in "_." and e.is_dir(follow_symlinks=True)), key=lambda e: e.name
    )


def _stat(rel: str, path: str) -> Seen | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return Seen(rel, path, st.st_size, st.st_mtime_ns, st.st_ino)


def _scan(root: Path) -> tuple[dict[str, Seen], list[RunFiles]]:
    """stat() every tracked file under ``root`` (plain strings: this is the whole no-op ingest)."""
    sweep_files: dict[str, Seen] = {}
    runs: list[RunFiles] = []
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
                files[entry.name] = Seen(
                    f"{sweep}/{run_id}/{entry.name}", entry.path, st.st_size, st.st_mtime_ns, st.st_ino
                )
            runs.append(RunFiles(sweep, run_id, Path(run_entry.path), files))
    return sweep_files, runs


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


def _read_known(path: Path, timeout_s: float, report: IngestReport) -> dict[str, Known]:
    """The bookkeeping table, creating or migrating the database first (one read-only open when current)."""
    if path.exists():
        with open_db(path, read_only=True, timeout_s=timeout_s, on_wait=report.add_lock_wait) as con:
            if check_version(con, path) == SCHEMA_VERSION:
                return {
                    row[0]: Known(*row[1:])
                    for row in con.execute(f"SELECT {KNOWN_COLUMNS} FROM ingest_files").fetchall()
                }
    with open_db(path, read_only=False, timeout_s=timeout_s, on_wait=report.add_lock_wait) as con:
        migrate(con)
        return {row[0]: Known(*row[1:]) for row in con.execute(f"SELECT {KNOWN_COLUMNS} FROM ingest_files").fetchall()}


@dataclass
class _Batch:
    """One write transaction: metrics files to read, and rows from the small JSON files."""

    # (sweep, run_id, file, bookkeeping)
    metrics: list[tuple[str, str, Seen, Known | None]] = field(default_factory=list)
    run_rows: list[dict[str, Any]] = field(default_factory=list)
    sweep_rows: list[dict[str, Any]] = field(default_factory=list)
    trial_rows: list[dict[str, Any]] = field(default_factory=list)
    # (file, sweep, run_id, problem)
    json_files: list[tuple[Seen, str | None, str | None, str | None]] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)  # bookkeeping paths whose files are gone
    vanished_metrics_runs: list[tuple[str, str]] = field(default_factory=list)  # (sweep, run_id)
    delete_runs: list[tuple[str, str]] = field(default_factory=list)  # (sweep, run_id)
    delete_sweeps: list[str] = field(default_factory=list)  # sweeps whose sweep.json is gone

    def has_json_work(self) -> bool:
        return any([self.run_rows, self.sweep_rows, self.trial_rows, self.json_files, self.vanished, self.delete_runs,
                    self.delete_sweeps])


def ingest(
    root: Path | str | None = None, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, batch_bytes: int = BATCH_BYTES
) -> IngestReport:
    """Copy what is new under ``root`` into ``<root>/cmscale.duckdb``; idempotent and incremental.

    Returns an :class:`IngestReport`. Malformed JSON files are listed in ``report.errors`` with
    their paths (the other runs are still ingested); torn last lines in ``report.warnings``.
    """
    t0 = time.perf_counter()
    root = check_root(Path(root) if root is not None else default_root())
    report = IngestReport(root=str(root))
    path = root / DB_FILE
    with _ingest_lock(root, timeout_s, report):
        try:
            known = _read_known(path, timeout_s, report)
            for batch in _batches(root, known, report, batch_bytes):
                _write_batch(path, batch, known, report, timeout_s)
        except (duckdb.Error, OSError) as error:
            # Disk full, a read-only root, a store damaged under us: the transaction was rolled back
            # and the run folders are untouched, so the next ingest picks up where this one stopped.
            raise unusable_store(path, error) from None
    report.seconds = time.perf_counter() - t0
    return report


class _Plans:
    """sweep.json files, parsed on first use."""

    def __init__(self, files: dict[str, Seen], report: IngestReport):
        self.files, self.report = files, report
        self.data: dict[str, dict[str, Any] | None] = {}
        self.runs: dict[str, dict[str, dict[str, Any]]] = {}

    def load(self, sweep: str) -> dict[str, Any] | None:
        if sweep not in self.data:
            seen = self.files.get(sweep)
            data = load_object(seen.path, self.report, SWEEP_FILE) if seen else None
            entries = (data or {}).get("runs") or []
            self.data[sweep] = data
            self.runs[sweep] = {str(e["run_id"]): e for e in entries if isinstance(e, dict) and "run_id" in e}
        return self.data[sweep]

    def planned(self, sweep: str) -> dict[str, dict[str, Any]]:
        self.load(sweep)
        return self.runs[sweep]


def _batches(root: Path, known: dict[str, Known], report: IngestReport, batch_bytes: int) -> list[_Batch]:
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

    def unchanged(seen: Seen) -> bool:
        present.add(seen.rel)
        entry = known.get(seen.rel)
        if entry is None or not entry.same_as(seen):
            return False
        if entry.problem:  # still the same malformed file: say so again, without re-reading it
            report.error(seen.path, entry.problem)
        return True

    def problem_of(seen: Seen) -> str | None:
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
            {"sweep": sweep, "spec_path": text(data.get("spec_path")), "n_runs": len(planned), "ingested_at": now()}
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
                rows = trial_rows(seen.path, run.run_id, report)
                final.trial_rows.extend(fit_integers(row, TRIAL_SCHEMA, seen.path, report) for row in rows)
                final.json_files.append((seen, run.sweep, run.run_id, problem_of(seen)))

    for rel in known:
        if rel in present:
            continue
        final.vanished.append(rel)
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == SWEEP_FILE:
            final.delete_sweeps.append(parts[0])  # the sweep's folder (or plan) was removed
        elif len(parts) == 3 and parts[2] == METRICS_FILE:
            final.vanished_metrics_runs.append((parts[0], parts[1]))  # metrics.jsonl deleted: so are its rows
        elif len(parts) == 3 and parts[2] in RUN_JSON_FILES:
            changed_runs.add((parts[0], parts[1]))

    for sweep, run_id in sorted(changed_runs):
        run = run_dirs.get((sweep, run_id))
        planned = plans.planned(sweep).get(run_id)
        if run is None and planned is None:
            final.delete_runs.append((sweep, run_id))  # run directory removed and not in the sweep's plan
            continue
        where = run.path if run is not None else root / sweep / run_id
        try:
            final.run_rows.append(fit_integers(run_row(sweep, run_id, run, planned, report), RUN_SCHEMA, where, report))
        except Exception as error:  # noqa: BLE001 - one run's bad files must not block the root
            report.error(where, f"run skipped: its files could not become a runs row ({error})")
            continue
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
    schema: dict[str, pl.DataType] | None = None, key: list[str] | None = None, null_safe: bool = False,
) -> None:
    """Insert rows, replacing those with the same key. ``key`` given: the table declares no primary
    key, so rows with these keys are deleted first (same transaction); ``null_safe``: key columns
    may hold nulls, and a null matches a null (IS NOT DISTINCT FROM)."""
    frame = pl.from_dicts(rows, schema=schema) if isinstance(rows, list) else rows
    if frame.height == 0:
        return
    columns = ", ".join(f'"{c}"' for c in frame.columns)
    con.register("_incoming", frame)
    try:
        if key and null_safe:
            same = " AND ".join(f"{table}.{name} IS NOT DISTINCT FROM i.{name}" for name in key)
            con.execute(f"DELETE FROM {table} WHERE EXISTS (SELECT 1 FROM _incoming i WHERE {same})")
            con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _incoming")
        elif key:
            # Key columns hold no nulls, so IN matches every replaced row.
            names = ", ".join(key)
            con.execute(f"DELETE FROM {table} WHERE ({names}) IN (SELECT {names} FROM _incoming)")
            con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _incoming")
        else:
            con.execute(f"INSERT OR REPLACE INTO {table} ({columns}) SELECT {columns} FROM _incoming")
    finally:
        con.unregister("_incoming")


def _read_batch(batch: _Batch, report: IngestReport) -> list[MetricsChunk]:
    chunks = []
    for sweep, run_id, seen, entry in batch.metrics:
        chunk = read_new_lines(sweep, run_id, seen, entry)
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


def _write_batch(path: Path, batch: _Batch, known: dict[str, Known], report: IngestReport, timeout_s: float) -> None:
    chunks = _read_batch(batch, report)
    widths = {(c.sweep, c.run_id): evaluated_ema_sigma_rel(Path(c.seen.path).parent) for c in chunks}
    train, evals = split_rows(parse_chunks(chunks, report), report, widths)
    stamp = now()
    file_rows = [
        {"path": c.seen.rel, "sweep": c.sweep, "run_id": c.run_id, "size": c.seen.size, "mtime_ns": c.seen.mtime_ns,
         "inode": c.seen.inode, "consumed": c.consumed, "fingerprint": c.fingerprint, "problem": None,
         "ingested_at": stamp}
        for c in chunks
    ] + [
        {"path": s.rel, "sweep": sweep, "run_id": run_id, "size": s.size, "mtime_ns": s.mtime_ns, "inode": s.inode,
         "consumed": s.size, "fingerprint": None, "problem": problem, "ingested_at": stamp}
        for s, sweep, run_id, problem in batch.json_files
    ]
    reset_runs = sorted({(c.sweep, c.run_id) for c in chunks if c.reset} | set(batch.vanished_metrics_runs))

    con = open_db(path, read_only=False, timeout_s=timeout_s, on_wait=report.add_lock_wait)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            # Without flock (some network file systems) a concurrent ingest may have taken a file
            # since the bookkeeping was read: leave those files to the next ingest.
            touched = [row["path"] for row in file_rows] + batch.vanished
            if touched:
                con.register("_touched", pl.DataFrame({"path": touched}, schema={"path": pl.String}))
                current = {
                    row[0]: Known(*row[1:])
                    for row in con.execute(
                        f"SELECT {KNOWN_COLUMNS} FROM ingest_files WHERE path IN (SELECT path FROM _touched)"
                    ).fetchall()
                }
                con.unregister("_touched")
                moved = {p for p in touched if current.get(p) != known.get(p)}
                if moved:
                    report.warn(
                        f"{len(moved)} files were ingested meanwhile by another process; left to the next ingest"
                    )
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
            _upsert(con, "evals", evals, key=EVAL_KEY, null_safe=True)
            _upsert(con, "runs", batch.run_rows, RUN_SCHEMA)
            _upsert(con, "sweeps", batch.sweep_rows, SWEEP_SCHEMA)
            _upsert(con, "trials", batch.trial_rows, TRIAL_SCHEMA)
            if batch.delete_runs:
                con.executemany("DELETE FROM runs WHERE sweep = ? AND run_id = ?", [list(r) for r in batch.delete_runs])
            if batch.delete_sweeps:
                con.executemany("DELETE FROM sweeps WHERE sweep = ?", [[sweep] for sweep in batch.delete_sweeps])
            if batch.vanished:
                con.executemany("DELETE FROM ingest_files WHERE path = ?", [[p] for p in batch.vanished])
            _upsert(con, "ingest_files", file_rows, FILE_SCHEMA)
            con.execute("COMMIT")
        except BaseException:
            rollback(con)
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
