"""Reading a sweep's evaluations from the DuckDB store, and the metric names the analysis uses.

The analysis is split in two so it can be tested without a store:

* **SQL readers** (this module): each returns the exact SQL text it ran together with the rows,
  so the report can print the query behind every figure. They call
  ``cmscale.results.read_query(sql, root=root)``.
* **Pure computation** (frontier.py, ratio.py, extrapolation.py, fit.py, pipeline.py): functions of pandas
  DataFrames with the columns documented here.

Metric names
------------
``fid_<k>step`` (e.g. ``fid_2step``) is the FID of the eval rows with ``sampler_steps = k`` for
consistency-model runs (ect, sct, scd). A teacher (method ``edm``) is evaluated with Heun's sampler
at its own step count, so for ``edm`` rows every ``fid_<k>step`` metric means the teacher's Heun
eval at its largest evaluated step count. Only runs whose status is ``done`` enter the fits;
the others are listed as warnings.

Point table (one row per eval): run_id, method, preset, params, seed, budget_flops, status,
teacher_run_id, step, train_flops, images_seen, sampler_steps, nfe, fid, extractor,
sampling_flops_per_image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cmscale.rundir import DB_FILE

TEACHER_METHOD = "edm"
_METRIC = re.compile(r"^fid_(\d+)step$")


@dataclass(frozen=True)
class Metric:
    """A parsed metric name: ``fid_<steps>step``."""

    name: str
    sampler_steps: int

    @property
    def label(self) -> str:
        return f"FID ({self.sampler_steps}-step)"


def parse_metric(name: str) -> Metric:
    match = _METRIC.match(name)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"unknown metric {name!r}; use fid_<k>step with k >= 1, e.g. fid_1step or fid_2step")
    return Metric(name, int(match.group(1)))


def sql_literal(value: str) -> str:
    """A SQL string literal (single quotes doubled), for names pasted into the printed queries."""
    return "'" + str(value).replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------
# SQL text
# --------------------------------------------------------------------------------------------

_POINT_COLUMNS = """r.run_id, r.method, r.preset, r.params, r.seed, r.budget_flops, r.status, r.teacher_run_id,
       e.step, e.train_flops, e.images_seen, e.sampler_steps, e.nfe, e.fid, e.extractor,
       e.sampling_flops_per_image"""


def points_sql(sweep: str, method: str, metric: Metric) -> str:
    """Every eval of ``method``'s finished runs at the metric's sampler steps (teachers: their
    largest Heun step count), ordered by size and compute."""
    if method == TEACHER_METHOD:
        steps = ("e.sampler_steps = (SELECT max(x.sampler_steps) FROM evals x "
                 "WHERE x.sweep = r.sweep AND x.run_id = r.run_id)")
    else:
        steps = f"e.sampler_steps = {int(metric.sampler_steps)}"
    return f"""SELECT {_POINT_COLUMNS}
FROM evals e JOIN runs r USING (sweep, run_id)
WHERE r.sweep = {sql_literal(sweep)} AND r.method = {sql_literal(method)} AND r.status = 'done'
  AND {steps}
ORDER BY r.params, r.run_id, e.train_flops"""


def final_evals_sql(sweep: str) -> str:
    """The final eval (largest step) of every finished run, for every sampler step count."""
    return f"""SELECT {_POINT_COLUMNS}
FROM evals e JOIN runs r USING (sweep, run_id)
WHERE r.sweep = {sql_literal(sweep)} AND r.status = 'done'
QUALIFY e.step = max(e.step) OVER (PARTITION BY e.sweep, e.run_id, e.sampler_steps, e.extractor)
ORDER BY r.method, r.params, r.run_id, e.sampler_steps"""


def ratio_pairs_sql(sweep: str) -> str:
    """Each finished student run's final evals beside its teacher's final Heun eval, paired by
    preset and seed (and feature extractor, so both FIDs are in the same space)."""
    s = sql_literal(sweep)
    return f"""WITH final AS (
  SELECT r.run_id, r.method, r.preset, r.params, r.seed, r.budget_flops, e.step, e.sampler_steps, e.fid, e.extractor
  FROM evals e JOIN runs r USING (sweep, run_id)
  WHERE r.sweep = {s} AND r.status = 'done'
  QUALIFY e.step = max(e.step) OVER (PARTITION BY e.sweep, e.run_id, e.sampler_steps, e.extractor)
),
teacher AS (
  SELECT run_id AS teacher_run_id, preset, seed, extractor, fid AS teacher_fid, sampler_steps AS teacher_steps,
         budget_flops AS teacher_budget_flops
  FROM final WHERE method = '{TEACHER_METHOD}'
  QUALIFY row_number() OVER (PARTITION BY run_id, extractor ORDER BY sampler_steps DESC) = 1
)
SELECT s.run_id, s.method, s.preset, s.params, s.seed, s.budget_flops, s.sampler_steps, s.fid AS student_fid,
       s.extractor, t.teacher_run_id, t.teacher_fid, t.teacher_steps
FROM final s JOIN teacher t USING (preset, seed, extractor)
WHERE s.method <> '{TEACHER_METHOD}'
ORDER BY s.method, s.sampler_steps, s.params, s.seed"""


def runs_sql(sweep: str) -> str:
    """Every run of the sweep with its status and reason (for the warnings)."""
    return f"""SELECT run_id, method, preset, params, seed, budget_flops, status, reason, final_step, train_flops
FROM runs WHERE sweep = {sql_literal(sweep)}
ORDER BY method, params, budget_flops, seed"""


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def store_path(root: Path | str) -> Path:
    """The store under ``root``; ValueError naming the fix when there is none."""
    db = Path(root) / DB_FILE
    if not db.exists():
        raise ValueError(f"{db}: no results store; run `cmscale results ingest --root {root}` first")
    return db


def run_query(sql: str, root: Path | str) -> pd.DataFrame:
    """Run ``sql`` on the store under ``root`` (without re-ingesting) and return pandas."""
    from cmscale.results import read_query

    store_path(root)
    return read_query(sql, root=Path(root)).to_pandas()


def sweep_runs(root: Path | str, sweep: str) -> pd.DataFrame:
    """The sweep's runs (:func:`runs_sql`); ValueError when the store holds none."""
    runs = run_query(runs_sql(sweep), root)
    if runs.empty:
        raise ValueError(
            f"sweep {sweep!r} has no runs in {Path(root) / DB_FILE}; check the name "
            f"(cmscale sweep status) and ingest it (cmscale results ingest --root {root})"
        )
    return runs


def method_points(root: Path | str, sweep: str, method: str, metric: Metric) -> tuple[str, pd.DataFrame, str | None]:
    """(the SQL, the point table of one feature extractor, a note when others were dropped) for
    ``method``'s finished runs at ``metric``."""
    sql = points_sql(sweep, method, metric)
    points, note = pick_extractor(run_query(sql, root))
    return sql, points, note


def frontier_points(points: pd.DataFrame) -> pd.DataFrame:
    """Eval rows of :func:`points_sql` -> the frontier's point table (run, params, size, compute, y)."""
    return pd.DataFrame(
        {
            "run": points["run_id"].astype(str),
            "params": points["params"].astype(float),
            "size": points["preset"].astype(str),
            "compute": points["train_flops"].astype(float),
            "y": points["fid"].astype(float),
        }
    )


def sweep_methods(runs: pd.DataFrame) -> list[str]:
    """Methods present in a runs table, teachers last."""
    methods = sorted(set(runs["method"]))
    return [m for m in methods if m != TEACHER_METHOD] + ([TEACHER_METHOD] if TEACHER_METHOD in methods else [])


def pick_extractor(points: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Keep one feature extractor (FIDs from different extractors are not comparable).

    Returns the rows of the most frequent extractor and a warning when others were dropped.
    """
    if points.empty or "extractor" not in points or points["extractor"].nunique() <= 1:
        return points, None
    counts = points["extractor"].value_counts()
    keep = str(counts.index[0])
    dropped = sorted(str(x) for x in counts.index[1:])
    return points[
        points["extractor"] == keep
    ], f"evals from several feature extractors; kept {keep!r}, dropped {dropped}"


def check_positive(table: pd.DataFrame, source: str, *columns: str) -> None:
    """ValueError naming the column and the first bad row unless every value is a number > 0."""
    for column in columns:
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = table[column].iloc[row]
            value = value.item() if isinstance(value, np.generic) else value  # 0.0, not np.float64(0.0)
            raise ValueError(f"{source}: column {column!r} must hold numbers > 0; row {row} has {value!r}")


def check_columns(table: pd.DataFrame, source: str, **columns: str | None) -> None:
    """ValueError unless ``table`` has every named column; the keywords name the options that gave them."""
    for option, column in columns.items():
        if column is not None and column not in table:
            raise ValueError(
                f"{source}: no column {column!r} (from --{option.replace('_', '-')}); columns are {list(table.columns)}"
            )


def json_safe(obj):
    """JSON-safe copy: NaN/inf -> null, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
