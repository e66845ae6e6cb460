"""Rows for the store: a metrics frame split into train and eval rows, and the small JSON files of a
run (config, status, done, job, trial) turned into ``runs`` and ``trials`` rows. Problems go into an
:class:`~cmscale.results.ingest_report.IngestReport` with the path of the file at fault.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from cmscale.results.files import RunFiles
from cmscale.results.ingest_report import IngestReport
from cmscale.results.schema import EVAL_COLUMNS, EVAL_KEY, TRAIN_COLUMNS, TRAIN_KEY, now
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

RUN_JSON_FILES = (CONFIG_FILE, STATUS_FILE, DONE_FILE, JOB_FILE)


# --------------------------------------------------------------------------- metrics rows


EVAL_INT32_COLUMNS = ("sampler_steps", "nfe", "num_samples")
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
