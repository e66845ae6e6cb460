"""The store's schema: the tables and views of ``<root>/cmscale.duckdb``, their column types, and
the migrations that build them.

A run's identity is (sweep, run_id), its folder ``<root>/<sweep>/<run_id>``: the same run id in two
sweeps (identical configs plan identical ids) names two runs. Keys: train (sweep, run_id, step),
evals (:data:`EVAL_KEY`: what tells two measurements apart, so a new eval never replaces another's
number), runs (sweep, run_id), sweeps (sweep), trials (study, trial_number; one row per attempt of
a retried trial). Rows are upserted, latest wins. train's and evals' keys are kept by ingestion
alone (delete, then insert, in one transaction): adding a column to an eval's identity is a new
column (a migration) and one more name in :data:`EVAL_KEY`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import duckdb
import polars as pl

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
    "kid": pl.Float64,
    "kid_std": pl.Float64,
    "num_samples": pl.Int64,
    "extractor": pl.String,
    "reference": pl.String,
    "sampling_flops_per_image": pl.Float64,
    "guidance": pl.Float64,
    "guidance_kind": pl.String,
    "class_balance": pl.String,
    "ema_sigma_rel": pl.Float64,
}
TRAIN_COLUMNS = ["sweep", "run_id", "step", "images_seen", "train_flops", "loss", "wall_s"]
EVAL_COLUMNS = [
    "sweep", "run_id", "step", "train_flops", "images_seen", "sampler_steps", "nfe", "fid", "num_samples",
    "extractor", "reference", "sampling_flops_per_image", "wall_s", "kid", "kid_std",
    "guidance", "guidance_kind", "class_balance", "ema_sigma_rel", "ema_posthoc",
]
RUN_KEY = ["sweep", "run_id"]  # a run's identity, in every table and view
TRAIN_KEY = [*RUN_KEY, "step"]
# What tells two evals of a run apart: a new eval with another of these values is a new row, never
# a replacement. A column added here must exist in evals (add it with a migration). guidance,
# guidance_kind and ema_sigma_rel may be null (an unguided or unconditional run; a run without a
# power EMA): ingestion matches keys null-safely (IS NOT DISTINCT FROM).
EVAL_KEY = [*RUN_KEY, "step", "sampler_steps", "extractor", "num_samples", "guidance", "guidance_kind",
            "ema_sigma_rel", "ema_posthoc"]

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
    "path": pl.String, "sweep": pl.String, "run_id": pl.String, "size": pl.Int64,
    "mtime_ns": pl.Int64, "inode": pl.Int64, "consumed": pl.Int64, "fingerprint": pl.String,
    "problem": pl.String, "ingested_at": pl.Datetime("us"),
}


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""


class ReadOnlyQueryError(StoreError):
    """A query tried to modify the database; queries run on a read-only connection."""


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction; a failed COMMIT (disk full) has ended it already, and its
    error, not the rollback's, is the one to report."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def now() -> datetime:
    """The current time as naive UTC (the store's timestamps)."""
    return datetime.now(UTC).replace(tzinfo=None)


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


# One row per run (schema 2 on): the runs columns, the final logged loss and the latest 1- and 2-step
# FID (the alphabetically first extractor when several measured the same step).
_RUN_SUMMARY_VIEW = """
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
        LEFT JOIN last_fid USING (sweep, run_id)"""


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
            wall_s DOUBLE, kid DOUBLE, kid_std DOUBLE,
            PRIMARY KEY (sweep, run_id, step, sampler_steps, extractor))""")
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
    con.execute(_RUN_SUMMARY_VIEW)


def _migration_3(con: duckdb.DuckDBPyConnection) -> None:
    """num_samples joins the eval's identity: a 20-sample eval at a step no longer replaces the
    500-sample one. evals loses its declared PRIMARY KEY (ingestion keeps the key, as for train), so a
    later key column is one more name in EVAL_KEY. latest_eval keeps, per extractor at the last step,
    the eval with the most samples. The rows are rebuilt from the run folders by the next ingest
    (a replaced eval's number was lost from the store, not from metrics.jsonl)."""
    for view in ("run_summary", "latest_eval"):
        con.execute(f"DROP VIEW IF EXISTS {view}")
    con.execute("DROP TABLE IF EXISTS evals")
    con.execute("""
        CREATE TABLE evals (
            sweep VARCHAR NOT NULL, run_id VARCHAR NOT NULL, step BIGINT NOT NULL, train_flops DOUBLE,
            images_seen BIGINT, sampler_steps INTEGER NOT NULL, nfe INTEGER, fid DOUBLE, num_samples INTEGER,
            extractor VARCHAR NOT NULL, reference VARCHAR, sampling_flops_per_image DOUBLE,
            wall_s DOUBLE, kid DOUBLE, kid_std DOUBLE)""")
    # Forget what was read of every metrics file, so the next ingest reads them whole again.
    con.execute("DELETE FROM ingest_files WHERE path LIKE '%/metrics.jsonl'")
    con.execute("DELETE FROM train")
    con.execute("""
        CREATE VIEW latest_eval AS
        SELECT * FROM evals
        QUALIFY step = max(step) OVER (PARTITION BY sweep, run_id, sampler_steps)
            AND coalesce(num_samples, 0) = max(coalesce(num_samples, 0))
                OVER (PARTITION BY sweep, run_id, sampler_steps, step, extractor)""")
    con.execute(_RUN_SUMMARY_VIEW)


def _migration_4(con: duckdb.DuckDBPyConnection) -> None:
    """Eval rows record how the samples were drawn: the guidance scale, its kind and the class balance
    (class-conditional runs), and which EMA was evaluated: ema_sigma_rel (the power EMA's width; for
    the run's own evals, the width of its evaluated EMA, config ema_sigma_rels[0], null for a
    classic ema_rates average) and ema_posthoc (true for ``cmscale eval --ema-sigma-rel`` rows,
    kind "eval-ema", a post-hoc reconstruction). guidance, guidance_kind, ema_sigma_rel and
    ema_posthoc join the eval key, so a post-hoc EMA eval or a guided eval never replaces another's
    number. latest_eval and run_summary read the run's own EMA only. The rows are rebuilt from the
    run folders by the next ingest (eval-ema rows were not ingested before)."""
    for view in ("run_summary", "latest_eval"):
        con.execute(f"DROP VIEW IF EXISTS {view}")
    con.execute("DROP TABLE IF EXISTS evals")
    con.execute("""
        CREATE TABLE evals (
            sweep VARCHAR NOT NULL, run_id VARCHAR NOT NULL, step BIGINT NOT NULL, train_flops DOUBLE,
            images_seen BIGINT, sampler_steps INTEGER NOT NULL, nfe INTEGER, fid DOUBLE, num_samples INTEGER,
            extractor VARCHAR NOT NULL, reference VARCHAR, sampling_flops_per_image DOUBLE,
            wall_s DOUBLE, kid DOUBLE, kid_std DOUBLE, guidance DOUBLE, guidance_kind VARCHAR,
            class_balance VARCHAR, ema_sigma_rel DOUBLE, ema_posthoc BOOLEAN NOT NULL DEFAULT false)""")
    # Forget what was read of every metrics file, so the next ingest reads them whole again.
    con.execute("DELETE FROM ingest_files WHERE path LIKE '%/metrics.jsonl'")
    con.execute("DELETE FROM train")
    con.execute("""
        CREATE VIEW latest_eval AS
        SELECT * FROM evals
        WHERE NOT ema_posthoc
        QUALIFY step = max(step) OVER (PARTITION BY sweep, run_id, sampler_steps)
            AND coalesce(num_samples, 0) = max(coalesce(num_samples, 0))
                OVER (PARTITION BY sweep, run_id, sampler_steps, step, extractor)""")
    con.execute(_RUN_SUMMARY_VIEW)


# (version, description, apply). Append new entries for schema changes; never edit old ones.
MIGRATIONS: list[tuple[int, str, Callable[[duckdb.DuckDBPyConnection], None]]] = [
    (1, "tables sweeps, runs, train, evals, trials, ingest_files; views latest_eval, run_summary", _migration_1),
    (2, "run identity (sweep, run_id) in every table and view; trials keep every attempt; evals gain kid, "
        "kid_std; rebuilt from the run folders by the next ingest", _migration_2),
    (3, "num_samples in the eval key (kept by ingestion, no declared primary key); latest_eval keeps the eval "
        "with the most samples; evals rebuilt from the run folders by the next ingest", _migration_3),
    (4, "evals gain guidance, guidance_kind, class_balance, ema_sigma_rel, ema_posthoc (post-hoc EMA evals are "
        "ingested); guidance and the EMA in the eval key; evals rebuilt from the run folders by the next ingest",
     _migration_4),
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


def migrate(con: duckdb.DuckDBPyConnection, target: int = SCHEMA_VERSION) -> list[int]:
    """Bring a read-write connection's database to :data:`SCHEMA_VERSION` (``target``: stop at that
    version, as an older cmscale would have; for tests of the migrations); returns the versions applied."""
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the store has schema version {current}, newer than this cmscale understands "
            f"({SCHEMA_VERSION}); upgrade cmscale, or move the store aside and run `cmscale results ingest` "
            "to build one this version reads"
        )
    applied = []
    for version, description, apply in MIGRATIONS:
        if version <= current or version > target:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP)"
            )
            apply(con)
            con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [version, description, now()])
            con.execute("COMMIT")
        except BaseException:
            rollback(con)
            raise
        applied.append(version)
    return applied
