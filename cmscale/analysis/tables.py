"""Fits of any table (``cmscale fit powerlaw|joint|frontier|ratio --csv/--parquet``).

Each function checks the columns it is given (a ValueError names the file, the column and the
option it came from), then fits with the same functions a sweep's analysis uses. The command
line only parses options, calls these and prints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cmscale.analysis.data import check_columns, check_positive
from cmscale.analysis.extrapolation import HoldoutResult, holdout_validation
from cmscale.analysis.fit import FitResult, fit_with_bootstrap, single_threaded_blas
from cmscale.analysis.optimal import ComputeOptimal, compute_optimal
from cmscale.analysis.ratio import ratio_table


def read_table(csv: Path | None, parquet: Path | None) -> tuple[pd.DataFrame, str]:
    """(the table, its path as text) from exactly one of a CSV or a Parquet file."""
    if (csv is None) == (parquet is None):
        raise ValueError("give exactly one of --csv FILE or --parquet FILE")
    path = csv or parquet
    try:
        table = pd.read_csv(path) if csv else pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the table ({error})") from None
    return table, str(path)


def table_power_law(
    table: pd.DataFrame, source: str, *, x_col: str, y_col: str, group_col: str | None, form: str, n_draws: int,
    seed: int, **fit_kwargs,
) -> FitResult:
    """``form`` (saturating or pure) of ``y_col`` in ``x_col``, bootstrap over ``group_col`` (each row when None)."""
    check_columns(table, source, x_col=x_col, y_col=y_col, group_col=group_col)
    check_positive(table, source, x_col, y_col)
    try:
        with single_threaded_blas():
            return fit_with_bootstrap(
                form, [table[x_col].to_numpy(float)], table[y_col].to_numpy(float),
                table[group_col].to_numpy() if group_col else None, n_draws=n_draws, seed=seed, **fit_kwargs,
            )
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def table_joint(
    table: pd.DataFrame, source: str, *, n_col: str, d_col: str | None, c_col: str | None, y_col: str,
    group_col: str | None, drop_top: int, n_draws: int, seed: int, **fit_kwargs,
) -> tuple[FitResult, HoldoutResult | None]:
    """``y = E + A N^-alpha + B D^-beta`` (D given, or C given and D = C / (6 N)); with ``drop_top``
    the K largest compute values are held out and predicted. Returns (fit, holdout or None)."""
    if (d_col is None) == (c_col is None):
        raise ValueError("give exactly one of --d-col or --c-col")
    check_columns(table, source, n_col=n_col, d_col=d_col, c_col=c_col, y_col=y_col, group_col=group_col)
    check_positive(table, source, *[c for c in (n_col, d_col, c_col, y_col) if c])
    table = table.copy()
    table["_N"] = table[n_col].astype(float)
    if c_col:
        table["_C"] = table[c_col].astype(float)
        table["_D"] = table["_C"] / (6.0 * table["_N"])
    else:
        table["_D"] = table[d_col].astype(float)
        table["_C"] = 6.0 * table["_N"] * table["_D"]
    try:
        with single_threaded_blas():
            if drop_top:
                held = holdout_validation(
                    table, form="joint", x_cols=["_N", "_D"], y_col=y_col, by="_C", k=drop_top, group_col=group_col,
                    n_draws=n_draws, seed=seed, **fit_kwargs,
                )
                return held.fit, held
            fit = fit_with_bootstrap(
                "joint", [table["_N"].to_numpy(float), table["_D"].to_numpy(float)], table[y_col].to_numpy(float),
                table[group_col].to_numpy() if group_col else None, n_draws=n_draws, seed=seed, **fit_kwargs,
            )
            return fit, None
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def holdout_json(held: HoldoutResult, y_col: str) -> dict:
    """The held-out rows of :func:`table_joint` in the table's terms (N, D, C, y)."""
    summary = held.to_json()
    summary.pop("fit")
    summary["points"] = [
        {
            "N": p["_N"], "D": p["_D"], "C": p["_C"], "y": p[y_col], "pred": p["pred"], "log_error": p["log_error"],
            "ci": [p["ci_lo"], p["ci_hi"]], "inside_ci": p["inside_ci"], "pi": [p["pi_lo"], p["pi_hi"]],
            "inside_pi": p["inside_pi"],
        }
        for p in summary["points"]
    ]
    return summary


def table_frontier(
    table: pd.DataFrame, source: str, *, size_col: str, compute_col: str, y_col: str, run_col: str | None,
    n_draws: int, seed: int,
) -> ComputeOptimal:
    """The compute-optimal size of a table of evals (a run per ``run_col`` value, each row when None)."""
    check_columns(table, source, size_col=size_col, compute_col=compute_col, y_col=y_col, run_col=run_col)
    check_positive(table, source, size_col, compute_col, y_col)
    points = pd.DataFrame(
        {
            "run": table[run_col].astype(str) if run_col else np.arange(len(table)).astype(str),
            "params": table[size_col].astype(float),
            "compute": table[compute_col].astype(float),
            "y": table[y_col].astype(float),
        }
    )
    try:
        with single_threaded_blas():
            return compute_optimal(points, n_draws=n_draws, seed=seed)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def table_ratio(
    table: pd.DataFrame, source: str, *, size_col: str, teacher_col: str, student_col: str, group_col: str | None,
    level: float,
) -> dict[str, dict]:
    """The teacher-student FID ratio per group of a table (one group when ``group_col`` is None)."""
    check_columns(table, source, size_col=size_col, teacher_col=teacher_col, student_col=student_col,
                  group_col=group_col)
    check_positive(table, source, size_col, teacher_col, student_col)
    pairs = pd.DataFrame(
        {
            "group": table[group_col].astype(str) if group_col else "all",
            "params": table[size_col].astype(float),
            "teacher_fid": table[teacher_col].astype(float),
            "student_fid": table[student_col].astype(float),
        }
    )
    return ratio_table(pairs, level=level)
