"""Extrapolation validation: fit without the largest budget(s) or size, predict what was held out.

A scaling law earns trust by predicting points it did not see. :func:`holdout_validation` drops
the rows whose ``by`` column takes one of its ``k`` largest values (the largest budgets, or the
largest model size), fits the law with a clustered bootstrap on the rest, and reports for every
held-out point:

* ``pred`` and ``log_error = log(pred / y)`` (negative: the law was too optimistic);
* ``ci_lo, ci_hi, inside_ci``: the bootstrap percentile band of the fitted *curve*;
* ``pi_lo, pi_hi, inside_pi``: the interval for a *new observation* (curve draws times a resampled
  full-fit residual), the one a noisy held-out point should fall in at the nominal rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cmscale.analysis.fit import FitResult, fit_with_bootstrap


@dataclass
class HoldoutResult:
    """Held-out predictions and the fit that made them."""

    form: str
    by: str
    held_values: list[float]
    fit: FitResult
    points: pd.DataFrame  # held-out rows with pred, log_error, ci_lo, ci_hi, inside_ci, pi_lo, pi_hi, inside_pi

    @property
    def mean_abs_log_error(self) -> float:
        return float(np.mean(np.abs(self.points["log_error"])))

    @property
    def rms_log_error(self) -> float:
        return float(np.sqrt(np.mean(self.points["log_error"] ** 2)))

    def to_json(self) -> dict:
        return {
            "form": self.form, "held_out_by": self.by, "held_out_values": self.held_values,
            "n_fit": self.fit.n_points, "n_held_out": int(len(self.points)),
            "mean_abs_log_error": self.mean_abs_log_error, "rms_log_error": self.rms_log_error,
            "frac_inside_ci": float(self.points["inside_ci"].mean()) if len(self.points) else math.nan,
            "frac_inside_pi": float(self.points["inside_pi"].mean()) if len(self.points) else math.nan,
            "fit": self.fit.to_json(),
            "points": self.points.to_dict(orient="records"),
        }


def holdout_validation(
    table: pd.DataFrame,
    *,
    form: str,
    x_cols: Sequence[str],
    y_col: str,
    by: str,
    k: int = 1,
    group_col: str | None = None,
    n_draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    **fit_kwargs,
) -> HoldoutResult:
    """Fit ``form`` (``saturating``/``pure`` on one x column, ``joint`` on N and D columns) without
    the rows holding the ``k`` largest values of ``by``, then predict those rows."""
    for column in [*x_cols, y_col, by] + ([group_col] if group_col else []):
        if column not in table:
            raise ValueError(f"holdout table has no column {column!r}; columns: {list(table.columns)}")
    if k < 1:
        raise ValueError(f"k (values held out) must be >= 1, got {k}")
    distinct = np.sort(table[by].dropna().unique())
    if distinct.size <= k:
        raise ValueError(f"cannot hold out the {k} largest {by!r} values: the table has only {distinct.size} distinct "
                         "value(s)")
    held_values = [float(v) for v in distinct[-k:]]
    held_mask = table[by].isin(held_values).to_numpy()
    train, held = table[~held_mask], table[held_mask].copy()
    groups = train[group_col].to_numpy() if group_col else None
    fit = fit_with_bootstrap(form, [train[c].to_numpy(float) for c in x_cols], train[y_col].to_numpy(float), groups,
                             n_draws=n_draws, seed=seed, level=level, **fit_kwargs)
    X_held = [held[c].to_numpy(float) for c in x_cols]
    y_held = held[y_col].to_numpy(float)
    held["pred"] = fit.predict(*X_held)
    held["log_error"] = np.log(held["pred"] / y_held)
    if fit.bootstrap is not None:
        lo, hi = fit.bootstrap.band(*X_held, level=level)
        plo, phi = fit.bootstrap.prediction_interval(*X_held, level=level, seed=seed)
    else:
        lo = hi = plo = phi = np.full(y_held.shape, np.nan)
    held["ci_lo"], held["ci_hi"] = lo, hi
    held["inside_ci"] = (y_held >= lo) & (y_held <= hi)
    held["pi_lo"], held["pi_hi"] = plo, phi
    held["inside_pi"] = (y_held >= plo) & (y_held <= phi)
    return HoldoutResult(form=form, by=by, held_values=held_values, fit=fit, points=held.reset_index(drop=True))
