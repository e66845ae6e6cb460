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
sampling_flops_per_image, ema_sigma_rel, ema_posthoc.

Which evals: each run's at its configured guidance scale, of one EMA per run (:class:`EmaChoice`,
``--ema``): by default the run's own EMA, the one evaluated during training; of evals that differ
only in their sample count (``cmscale eval RUN --num-samples 20`` beside a 500-sample eval), the one
with the most samples (:func:`chosen_evals_cte`, the one place that picks them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cmscale.results.schema import EVAL_KEY
from cmscale.rundir import DB_FILE

TEACHER_METHOD = "edm"  # the method column of a teacher run in the store (``is_teacher``)
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


def is_teacher(name):
    """Whether a stored run's method ``name`` (or each of a pandas column of them) is a teacher's,
    evaluated with Heun's sampler at its own step count: the analysis's one test of it. It reads
    names from the store, so it does not ask the recipe table (cmscale.methods imports torch)."""
    return name == TEACHER_METHOD


def sql_literal(value: str) -> str:
    """A SQL string literal (single quotes doubled), for names pasted into the printed queries."""
    return "'" + str(value).replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------
# SQL text
# --------------------------------------------------------------------------------------------

_POINT_COLUMNS = """r.run_id, r.method, r.preset, r.params, r.seed, r.budget_flops, r.status, r.teacher_run_id,
       e.step, e.train_flops, e.images_seen, e.sampler_steps, e.nfe, e.fid, e.extractor,
       e.sampling_flops_per_image, e.ema_sigma_rel, e.ema_posthoc"""

# An eval's guidance scale (null: an unguided or unconditional run) against its run's configured one.
_CONFIGURED_GUIDANCE = (
    "coalesce(e.guidance, 1.0) = coalesce(TRY_CAST(json_extract_string(r.config_json, '$.guidance') AS DOUBLE), 1.0)"
)


@dataclass(frozen=True)
class EmaChoice:
    """Which EMA of each run the analysis reads (``--ema``).

    * ``trained`` (the default): the run's own EMA, the one evaluated during training and by
      ``cmscale eval`` (``ema_posthoc`` false; its width, config ``ema_sigma_rels[0]``, is the
      evals' ``ema_sigma_rel``), over the whole run;
    * ``best``: per run (and sampler step count and feature extractor), the EMA whose last eval has
      the lowest FID among the run's own EMA and its post-hoc reconstructions
      (``cmscale eval --ema-sigma-rel``). The optimal width changes with model size (EDM2, fig. 5):
      a study that fixes it biases its exponents;
    * a width (``0.05``): each run's evals at that ``ema_sigma_rel``, its own EMA where that is the
      width (the whole run), else the post-hoc reconstruction's; a run with neither is left out.

    A post-hoc EMA exists where it was reconstructed (the run's last snapshot), so a run whose EMA
    taken is post-hoc contributes that one eval."""

    mode: str = "trained"  # trained | best | width
    width: float | None = None

    @classmethod
    def parse(cls, text: str | float | None) -> EmaChoice:
        if text is None or (isinstance(text, str) and text.strip().lower() in ("", "trained")):
            return cls()
        if isinstance(text, str) and text.strip().lower() == "best":
            return cls("best")
        try:
            width = float(text)
        except ValueError:
            raise ValueError(
                f"--ema {text!r}: give 'best', 'trained' or an EMA width (ema_sigma_rel) such as 0.05") from None
        if not 0 < width < 1 or not math.isfinite(width):
            raise ValueError(f"--ema {text!r}: an EMA width (ema_sigma_rel) lies in (0, 1), e.g. 0.05 or 0.1")
        return cls("width", width)

    @property
    def is_default(self) -> bool:
        return self.mode == "trained"

    @property
    def option(self) -> str:
        return f"{self.width:g}" if self.mode == "width" else self.mode

    @property
    def description(self) -> str:
        if self.mode == "best":
            return ("EMA: per run and sampler step count, the EMA width whose final eval has the lowest FID among "
                    "the run's own EMA and its post-hoc reconstructions (--ema best)")
        if self.mode == "width":
            return (f"EMA: each run's evals at ema_sigma_rel = {self.width:g}: its own EMA where that is its width, "
                    f"else the post-hoc reconstruction's (--ema {self.width:g})")
        return ("EMA: each run's own EMA, the one evaluated during training (config ema_sigma_rels[0]); post-hoc "
                "EMA evals are left out (choose with --ema best or --ema WIDTH)")


GUIDANCE_DESCRIPTION = ("Guidance: each run's evals at its configured guidance scale (config guidance; 1 without "
                        "guidance); evals at another scale are left out and counted in the warnings.")


# An eval's key without num_samples: the evals of one measurement point that differ only in their
# sample count (a 20-sample check beside the 500-sample eval), of which the analysis reads one.
_POINT_KEY = ", ".join(f"e.{column}" for column in EVAL_KEY if column != "num_samples")


def chosen_evals_cte(sweep: str, ema: EmaChoice | None = None) -> str:
    """``WITH`` clauses ending in ``chosen_evals``: the evals of the sweep's finished runs at each
    run's configured guidance, of the EMA that ``ema`` picks (:class:`EmaChoice`); of evals that
    differ only in their sample count, the one with the most samples (as the store's ``latest_eval``),
    so a quick few-sample eval never becomes a second point nor replaces the number."""
    ema = ema or EmaChoice()
    s = sql_literal(sweep)
    run_evals = f"""WITH run_evals AS (  -- at each run's configured guidance; per eval key, the most samples
  SELECT e.* FROM evals e JOIN runs r USING (sweep, run_id)
  WHERE r.sweep = {s} AND r.status = 'done'
    AND {_CONFIGURED_GUIDANCE}
  QUALIFY row_number() OVER (PARTITION BY {_POINT_KEY} ORDER BY e.num_samples DESC NULLS LAST) = 1
)"""
    if ema.is_default:
        return f"""{run_evals},
chosen_evals AS (  -- each run's own EMA
  SELECT * FROM run_evals WHERE NOT ema_posthoc
)"""
    if ema.mode == "best":
        pick = "WHERE fid IS NOT NULL"
        order = "fid, ema_posthoc, ema_sigma_rel NULLS LAST"
        comment = "the lowest final FID"
    else:
        pick = f"WHERE ema_sigma_rel = {float(ema.width)!r}"
        order = "ema_posthoc"
        comment = f"ema_sigma_rel = {ema.width:g}, the run's own EMA before a post-hoc one"
    return f"""{run_evals},
ema_final AS (  -- the last eval of each EMA (own or post-hoc, by width) of each run
  SELECT sweep, run_id, sampler_steps, extractor, ema_posthoc, ema_sigma_rel, fid
  FROM run_evals
  QUALIFY step = max(step) OVER (
    PARTITION BY sweep, run_id, sampler_steps, extractor, ema_posthoc, ema_sigma_rel)
),
ema_taken AS (  -- per run, sampler step count and extractor: {comment}
  SELECT * FROM ema_final {pick}
  QUALIFY row_number() OVER (PARTITION BY sweep, run_id, sampler_steps, extractor ORDER BY {order}) = 1
),
chosen_evals AS (
  SELECT e.* FROM run_evals e
  JOIN ema_taken t ON t.sweep = e.sweep AND t.run_id = e.run_id AND t.sampler_steps = e.sampler_steps
    AND t.extractor = e.extractor AND t.ema_posthoc = e.ema_posthoc
    AND t.ema_sigma_rel IS NOT DISTINCT FROM e.ema_sigma_rel
)"""


def points_sql(sweep: str, method: str, metric: Metric, ema: EmaChoice | None = None) -> str:
    """Every eval of ``method``'s finished runs at the metric's sampler steps (teachers: their
    largest Heun step count), of the EMA ``ema`` picks, ordered by size and compute."""
    if is_teacher(method):
        steps = ("e.sampler_steps = (SELECT max(x.sampler_steps) FROM chosen_evals x "
                 "WHERE x.sweep = r.sweep AND x.run_id = r.run_id)")
    else:
        steps = f"e.sampler_steps = {int(metric.sampler_steps)}"
    return f"""{chosen_evals_cte(sweep, ema)}
SELECT {_POINT_COLUMNS}
FROM chosen_evals e JOIN runs r USING (sweep, run_id)
WHERE r.method = {sql_literal(method)} AND {steps}
ORDER BY r.params, r.run_id, e.train_flops"""


def final_evals_sql(sweep: str, ema: EmaChoice | None = None) -> str:
    """The final eval (largest step) of every finished run, for every sampler step count, of the
    EMA ``ema`` picks."""
    return f"""{chosen_evals_cte(sweep, ema)}
SELECT {_POINT_COLUMNS}
FROM chosen_evals e JOIN runs r USING (sweep, run_id)
QUALIFY e.step = max(e.step) OVER (PARTITION BY e.sweep, e.run_id, e.sampler_steps, e.extractor)
ORDER BY r.method, r.params, r.run_id, e.sampler_steps"""


def ratio_pairs_sql(sweep: str, ema: EmaChoice | None = None) -> str:
    """Each finished student run's final evals beside its teacher's final Heun eval, paired by
    preset and seed (and feature extractor, so both FIDs are in the same space), each of the EMA
    ``ema`` picks."""
    return f"""{chosen_evals_cte(sweep, ema)},
final AS (
  SELECT r.run_id, r.method, r.preset, r.params, r.seed, r.budget_flops, e.step, e.sampler_steps, e.fid, e.extractor
  FROM chosen_evals e JOIN runs r USING (sweep, run_id)
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


def other_guidance_sql(sweep: str) -> str:
    """Per finished run, its evals at a guidance scale other than its configured one (left out)."""
    return f"""SELECT r.run_id, coalesce(e.guidance, 1.0) AS guidance,
       coalesce(TRY_CAST(json_extract_string(r.config_json, '$.guidance') AS DOUBLE), 1.0) AS configured,
       count(*) AS n_evals
FROM evals e JOIN runs r USING (sweep, run_id)
WHERE r.sweep = {sql_literal(sweep)} AND r.status = 'done' AND NOT ({_CONFIGURED_GUIDANCE})
GROUP BY ALL ORDER BY r.run_id, guidance"""


def run_guidance_sql(sweep: str) -> str:
    """Each finished run's configured guidance scale (config guidance; 1 without guidance)."""
    return f"""SELECT run_id,
       coalesce(TRY_CAST(json_extract_string(config_json, '$.guidance') AS DOUBLE), 1.0) AS guidance
FROM runs WHERE sweep = {sql_literal(sweep)} AND status = 'done' ORDER BY run_id"""


def ema_widths_sql(sweep: str) -> str:
    """The EMAs evaluated per finished run: its own and each post-hoc width, with their eval counts."""
    return f"""SELECT r.run_id, e.ema_posthoc, e.ema_sigma_rel, count(*) AS n_evals
FROM evals e JOIN runs r USING (sweep, run_id)
WHERE r.sweep = {sql_literal(sweep)} AND r.status = 'done'
GROUP BY ALL ORDER BY r.run_id, e.ema_posthoc, e.ema_sigma_rel"""


def ema_text(width, posthoc) -> str:
    """An EMA in words: ``0.05 (post-hoc)``, ``0.1 (own)``; a classic EMA has no width."""
    shown = "ema_rates" if width is None or (isinstance(width, float) and math.isnan(width)) else f"{float(width):g}"
    return f"{shown} ({'post-hoc' if bool(posthoc) else 'own'})"


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


def method_points(
    root: Path | str, sweep: str, method: str, metric: Metric, ema: EmaChoice | None = None
) -> tuple[str, pd.DataFrame, str | None]:
    """(the SQL, the point table of one feature extractor, a note when others were dropped) for
    ``method``'s finished runs at ``metric``, of the EMA ``ema`` picks (default: the run's own)."""
    sql = points_sql(sweep, method, metric, ema)
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
    return [m for m in methods if not is_teacher(m)] + [m for m in methods if is_teacher(m)]


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
