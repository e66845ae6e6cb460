"""Files to rows: the new complete lines of a ``metrics.jsonl`` parsed into train and eval rows,
and the small JSON files of a run (config, status, done, job, trial) turned into ``runs`` and
``trials`` rows. Problems go into an :class:`IngestReport` with the path of the file at fault.

Ingestion is incremental: the bookkeeping (:class:`Known`) remembers, per file, the size, mtime and
inode it had when last read and, for ``metrics.jsonl``, the byte offset consumed so far (only
complete lines) with a fingerprint of the 4 KiB before that offset. A grown file is read from the
offset. A torn last line (a job killed mid-write, or a write in flight) is left for the next
ingest. On resume the trainer rewrites ``metrics.jsonl`` without the rows after the checkpoint step
(atomic replace: new inode, possibly shorter, different bytes before the offset); any of these
signs makes :func:`read_new_lines` re-read the whole file and mark the chunk ``reset``, so the
database mirrors the file and never holds a step twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cmscale.results.schema import (
    EVAL_COLUMNS,
    EVAL_KEY,
    METRIC_SCHEMA,
    TRAIN_COLUMNS,
    TRAIN_KEY,
    now,
)
from cmscale.rundir import (
    CONFIG_FILE,
    DONE_FILE,
    DONE_STATE_KEY,
    ITERATIONS_KEY,
    JOB_FILE,
    STATUS_FILE,
    STATUS_STATE_KEY,
    TRIAL_FILE,
    RunState,
    budget_in_flops,
)

log = logging.getLogger(__name__)

RUN_JSON_FILES = (CONFIG_FILE, STATUS_FILE, DONE_FILE, JOB_FILE)
FINGERPRINT_BYTES = 4096


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



# --------------------------------------------------------------------------- scanning


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


# --------------------------------------------------------------------------- metrics files


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


def _first_value_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        obj.setdefault(key, value)
    return obj


EVAL_INT32_COLUMNS = ("sampler_steps", "nfe", "num_samples")
BLOCK_LINES = 2048  # a chunk the fast reader rejects is retried in blocks of this many lines


def _parse_lines_slowly(path: str, data: bytes, start: int, report: IngestReport) -> pl.DataFrame:
    """Row by row, for lines the fast reader rejected: a line that is not a JSON object, or a value
    of the wrong type, skips that row alone, reported as an error with its byte offset and field.
    ``data`` holds complete lines starting at byte ``start`` of the file at ``path``."""
    rows = []
    position = start
    for line in data.split(b"\n")[:-1]:
        offset = position
        position += len(line) + 1
        if not line.strip():
            continue
        try:
            # NaN and Infinity (which json.dumps writes) are accepted. A key given twice keeps its
            # first value, as the fast reader (polars) does: a line means the same in either path.
            row = json.loads(line, object_pairs_hook=_first_value_wins)
        except ValueError as error:
            report.error(path, f"byte {offset}: not a JSON line ({error}); row skipped")
            continue
        if not isinstance(row, dict):
            kind = type(row).__name__
            report.error(path, f"byte {offset}: expected a JSON object, got {kind}; row skipped")
            continue
        converted = {}
        for key, dtype in METRIC_SCHEMA.items():
            try:
                converted[key] = _convert_value(row.get(key), dtype)
            except ValueError as reason:
                shown = repr(row.get(key))
                report.error(path, f"byte {offset}: field {key!r} is {shown[:80]}, {reason}; row skipped")
                break
        else:
            rows.append(converted)
    if not rows:
        return pl.DataFrame(schema=METRIC_SCHEMA)
    return pl.from_dicts(rows, schema=METRIC_SCHEMA)


def _parse_in_blocks(chunk: MetricsChunk, report: IngestReport) -> pl.DataFrame:
    """A chunk the fast reader rejected, retried in blocks of BLOCK_LINES lines: only the blocks that
    hold a bad line (or NaN, which polars rejects) are parsed row by row, so one bad value costs the
    Python parse of one block, not of the whole file."""
    data = bytes(chunk.view)
    frames, block_start, offset = [], 0, chunk.start
    while block_start < len(data):
        block_end = block_start
        for _ in range(BLOCK_LINES):
            block_end = data.index(b"\n", block_end) + 1
            if block_end == len(data):
                break
        block = data[block_start:block_end]
        try:
            frame = pl.read_ndjson(io.BytesIO(block), schema=METRIC_SCHEMA)
            if frame.height != block.count(b"\n"):
                raise ValueError("blank lines")
        except Exception:  # noqa: BLE001 - polars rejects NaN/Infinity, malformed lines and wrong types
            frame = _parse_lines_slowly(str(chunk.seen.path), block, offset, report)
        frames.append(frame)
        offset += len(block)
        block_start = block_end
    return pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=METRIC_SCHEMA)


def _with_identity(frame: pl.DataFrame, chunk: MetricsChunk) -> pl.DataFrame:
    return frame.insert_column(0, pl.Series("run_id", [chunk.run_id] * frame.height, pl.String)).insert_column(
        0, pl.Series("sweep", [chunk.sweep] * frame.height, pl.String))


def parse_chunks(chunks: list[MetricsChunk], report: IngestReport) -> pl.DataFrame:
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
                frame = _parse_in_blocks(chunk, report)
        except Exception:  # noqa: BLE001
            frame = _parse_in_blocks(chunk, report)
        frames.append(_with_identity(frame, chunk))
    return pl.concat(frames, how="vertical")


EVAL_KINDS = ("eval", "eval-ema")  # the run's own EMA (trainer, `cmscale eval`); a post-hoc EMA (--ema-sigma-rel)


def evaluated_ema_sigma_rel(run_dir: Path | str) -> float | None:
    """The width of the power EMA that a run's own evals measure: ``ema_sigma_rels[0]`` of its
    config.json (the first average is the one evaluated and exported); None for a classic
    ``ema_rates`` average, or a config that cannot be read (its problem is reported with the runs row)."""
    try:
        with open(Path(run_dir) / CONFIG_FILE, "rb") as handle:
            config = json.loads(handle.read())
        widths = config.get("ema_sigma_rels") if isinstance(config, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(widths, list) or not widths:
        return None
    width = widths[0]
    return float(width) if isinstance(width, int | float) and not isinstance(width, bool) else None


def split_rows(
    frame: pl.DataFrame, report: IngestReport, evaluated_widths: dict[tuple[str, str], float | None] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Train and eval rows, each deduplicated on its key (a later line wins).

    Eval rows of kind "eval" measure the run's own EMA: without an ``ema_sigma_rel`` of their own they
    get ``evaluated_widths[(sweep, run_id)]`` (:func:`evaluated_ema_sigma_rel`); "eval-ema" rows
    (a post-hoc reconstruction) are marked ``ema_posthoc``."""
    is_train, has_step = pl.col("kind") == "train", pl.col("step").is_not_null()
    is_eval = pl.col("kind").is_in(EVAL_KINDS)
    missing = frame.lazy().filter((is_train | is_eval) & ~has_step).select("run_id").collect()
    if missing.height:
        report.warn(
            f"{missing.height} metrics rows without a step skipped (runs: {', '.join(sorted(set(missing['run_id'])))})"
        )
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
    # evals keeps these in 32-bit INTEGER columns: a value beyond them would fail the whole batch.
    too_large = pl.any_horizontal(pl.col(name).abs() >= 2**31 for name in EVAL_INT32_COLUMNS).fill_null(False)
    outside = evals.filter(too_large)
    if outside.height:
        runs = ", ".join(sorted(set(outside["run_id"])))
        report.error(f"metrics.jsonl of runs {runs}", f"{outside.height} eval rows with {'/'.join(EVAL_INT32_COLUMNS)} "
                     "beyond 32 bits skipped (no sampler or sample count is that large: the rows are damaged)")
        evals = evals.filter(~too_large)
    posthoc = pl.col("kind") == "eval-ema"
    widths = pl.DataFrame(
        {"sweep": [key[0] for key in evaluated_widths or {}], "run_id": [key[1] for key in evaluated_widths or {}],
         "_evaluated_width": list((evaluated_widths or {}).values())},
        schema={"sweep": pl.String, "run_id": pl.String, "_evaluated_width": pl.Float64},
    )
    evals = (
        evals.filter(pl.col("sampler_steps").is_not_null())
        .join(widths, on=["sweep", "run_id"], how="left", maintain_order="left")
        .with_columns(
            pl.col("extractor").fill_null(""),
            pl.col("num_samples").fill_null(0),
            pl.when(posthoc).then(pl.col("ema_sigma_rel"))
            .otherwise(pl.col("ema_sigma_rel").fill_null(pl.col("_evaluated_width"))).alias("ema_sigma_rel"),
            posthoc.alias("ema_posthoc"),
        )
        .select(EVAL_COLUMNS)
        .unique(subset=EVAL_KEY, keep="last", maintain_order=True)
    )
    return train, evals


# --------------------------------------------------------------------------- JSON files -> rows


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


def text(value: Any) -> str | None:
    return None if value is None else str(value)


def load_object(path: Path, report: IngestReport, name: str) -> dict[str, Any] | None:
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


INTEGER_RANGES = {pl.Int32: (-(2**31), 2**31), pl.Int64: (-(2**63), 2**63)}


def fit_integers(
    row: dict[str, Any], schema: dict[str, pl.DataType], path: Path | str, report: IngestReport
) -> dict[str, Any]:
    """``row`` with each integer the store's column cannot hold (a seed of 2**31 in an INTEGER
    column) stored as null and reported under ``path``, so one value never blocks the root."""
    for name, dtype in schema.items():
        bounds = INTEGER_RANGES.get(dtype)
        value = row.get(name)
        if bounds is None or not isinstance(value, int) or bounds[0] <= value < bounds[1]:
            continue
        report.error(path, f"field {name!r} = {value} does not fit the store's {dtype} column; stored as null. "
                           f"Values must lie in [{bounds[0]}, {bounds[1]})")
        row[name] = None
    return row


def run_row(
    sweep: str, run_id: str, run: RunFiles | None, planned: dict[str, Any] | None, report: IngestReport
) -> dict[str, Any]:
    """The ``runs`` row: config.json (else the sweep plan's config), done.json, status.json, job.json."""
    files = run.files if run else {}
    loaded = {name: load_object(files[name].path, report, name) if name in files else None for name in RUN_JSON_FILES}
    config = loaded[CONFIG_FILE]
    if config is None and planned is not None:
        config = dict(planned.get("config") or {})
        config.setdefault("flops_per_step", planned.get("flops_per_step"))
        config.setdefault(ITERATIONS_KEY, planned.get("iterations"))
    config = config or {}
    done = loaded[DONE_FILE] or {}
    status = loaded[STATUS_FILE] or {}
    job = loaded[JOB_FILE] or {}

    flops_per_step = _number(config.get("flops_per_step"), float)
    budget_iters = _number(config.get(ITERATIONS_KEY) or config.get("budget_iters"), int)
    budget_flops = budget_in_flops(_number(config.get("budget_flops"), float), budget_iters, flops_per_step)
    slurm_job_id = status.get("slurm_job_id")
    if slurm_job_id is None and job.get("executor") == "slurm":
        slurm_job_id = job.get("job_id")
    return {
        "run_id": run_id,
        "sweep": sweep,
        "method": text(config.get("method")),
        "preset": text(config.get("preset")),
        "params": _number(config.get("params"), int),
        "dataset": text(config.get("dataset")),
        "resolution": _number(config.get("resolution"), int),
        "batch_size": _number(config.get("batch_size"), int),
        "budget_flops": budget_flops,
        "budget_iters": budget_iters,
        "flops_per_step": flops_per_step,
        "flops_per_image_forward": _number(config.get("flops_per_image_forward"), float),
        "seed": _number(config.get("seed"), int),
        "teacher_run_id": text(config.get("teacher_run_id")),
        "status": text(done.get(DONE_STATE_KEY) or status.get(STATUS_STATE_KEY) or RunState.PLANNED),
        "reason": text(done.get("reason") if done else status.get("reason")),
        "host": text(status.get("host")),
        "slurm_job_id": text(slurm_job_id),
        "git_commit": text(config.get("git_commit")),
        "config_json": json.dumps(config, sort_keys=True) if config else None,
        "started": _timestamp(done.get("started") or status.get("started")),
        "finished": _timestamp(done.get("finished")),
        "final_step": _number(done.get("final_step"), int),
        "train_flops": _number(done.get("train_flops"), float),
        "wall_s": _number(done.get("wall_s"), float),
        "img_channels": _number(config.get("img_channels"), int),
        "world_size": _number(config.get("world_size"), int),
        "executor": text(job.get("executor")),
        "attempt": _number(job.get("attempt"), int),
        "status_updated": _timestamp(status.get("updated")),
        "run_dir": str(run.path) if run else None,
        "ingested_at": now(),
    }


def trial_rows(path: Path, run_id: str, report: IngestReport) -> list[dict[str, Any]]:
    """One row per attempt in a trial.json: the current trial and each earlier (failed) attempt."""
    trial = load_object(path, report, TRIAL_FILE)
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
            "state": text(record.get("state")),
            "params_json": json.dumps(record.get("params") or {}, sort_keys=True),
            "values_json": None if values is None else json.dumps(values),
            "run_id": text(record.get("run_id") or run_id),
            "updated": _timestamp(record.get("updated")),
            "attempt": _number(record.get("attempt"), int),
            "reason": text(record.get("reason")),
        })
    return rows
