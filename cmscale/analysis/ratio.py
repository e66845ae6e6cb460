"""Teacher-student FID ratio: does distillation lose a constant fraction at every size?

sCM's claim is that a 2-step student stays within ~10% of its teacher's FID and that the ratio
``r = FID_student / FID_teacher`` does not drift with model size. For every group (student method
and sampler step count) this module estimates, from pairs (params N, teacher FID, student FID):

* the regression ``log r = c + s log N`` (statsmodels OLS): the slope ``s`` with its CI and the
  p-value for ``s = 0``. A constant ratio means ``s = 0``;
* with at least 4 pairs, also ``log r = c + s log N + u log FID_teacher``, which separates a drift
  with size from a drift with teacher quality (the two are correlated, so read it with care);
* the mean ratio with a t-interval, and the mean absolute gap ``FID_student - FID_teacher`` with a
  t-interval.

Pairs come from :func:`cmscale.analysis.data.ratio_pairs_sql` (student and teacher matched by
preset and seed) or from any table (``cmscale fit ratio --csv``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cmscale.analysis.fit import MIN_CI_GROUPS

PAIR_COLUMNS = ("group", "params", "teacher_fid", "student_fid")


def _t_interval(values: np.ndarray, level: float) -> tuple[float, float, float]:
    """Mean and its t-interval (statsmodels DescrStatsW); no interval from fewer than MIN_CI_GROUPS
    values (with two, a t-interval spans the sign and says nothing)."""
    from statsmodels.stats.weightstats import DescrStatsW

    values = np.asarray(values, float)
    mean = float(values.mean())
    if values.size < MIN_CI_GROUPS:
        return mean, math.nan, math.nan
    lo, hi = DescrStatsW(values).tconfint_mean(alpha=1 - level)
    return mean, float(lo), float(hi)


def ratio_regression(params, teacher_fid, student_fid, *, level: float = 0.95, cov_type: str = "nonrobust") -> dict:
    """All ratio statistics for one group; see the module docstring.

    ``cov_type`` is passed to statsmodels (``nonrobust`` by default: with a handful of sizes the
    HC3 sandwich is itself too noisy to trust; pass ``HC3`` for large groups).
    """
    import statsmodels.api as sm

    params = np.asarray(params, float)
    teacher = np.asarray(teacher_fid, float)
    student = np.asarray(student_fid, float)
    if not (params.shape == teacher.shape == student.shape):
        raise ValueError("params, teacher_fid and student_fid must have the same length")
    for name, values in (("params", params), ("teacher_fid", teacher), ("student_fid", student)):
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"ratio analysis: column {name} must be finite and > 0")
    ratio = student / teacher
    mean_ratio, ratio_lo, ratio_hi = _t_interval(ratio, level)
    gap, gap_lo, gap_hi = _t_interval(student - teacher, level)
    out = {
        "n_points": int(ratio.size),
        "n_sizes": int(np.unique(params).size),
        "mean_ratio": mean_ratio,
        "ci": [ratio_lo, ratio_hi],
        "geo_mean_ratio": float(np.exp(np.mean(np.log(ratio)))),
        "gap": gap,
        "gap_ci": [gap_lo, gap_hi],
        "slope": math.nan,
        "slope_ci": [math.nan, math.nan],
        "slope_p": math.nan,
        "level": level,
        "cov_type": cov_type,
    }
    log_r = np.log(ratio)
    if np.unique(params).size >= 2 and ratio.size >= 3:
        model = sm.OLS(log_r, sm.add_constant(np.log(params))).fit(cov_type=cov_type, use_t=True)
        lo, hi = model.conf_int(alpha=1 - level)[1]
        out.update(slope=float(model.params[1]), slope_ci=[float(lo), float(hi)], slope_p=float(model.pvalues[1]),
                   intercept=float(model.params[0]), r2=float(model.rsquared))
    if ratio.size >= 4 and np.unique(params).size >= 2 and np.ptp(np.log(teacher)) > 0:
        design = sm.add_constant(np.column_stack([np.log(params), np.log(teacher)]))
        model = sm.OLS(log_r, design).fit(cov_type=cov_type, use_t=True)
        ci = model.conf_int(alpha=1 - level)
        out["with_teacher_fid"] = {
            "slope_params": float(model.params[1]), "slope_params_ci": [float(ci[1][0]), float(ci[1][1])],
            "slope_params_p": float(model.pvalues[1]),
            "slope_teacher_fid": float(model.params[2]), "slope_teacher_fid_ci": [float(ci[2][0]), float(ci[2][1])],
            "slope_teacher_fid_p": float(model.pvalues[2]),
            "corr_logN_logteacher": float(np.corrcoef(np.log(params), np.log(teacher))[0, 1]),
        }
    return out


def ratio_table(pairs: pd.DataFrame, *, level: float = 0.95, cov_type: str = "nonrobust") -> dict[str, dict]:
    """:func:`ratio_regression` per group. ``pairs`` has columns group, params, teacher_fid, student_fid."""
    missing = set(PAIR_COLUMNS) - set(pairs.columns)
    if missing:
        raise ValueError(f"ratio pairs need columns {list(PAIR_COLUMNS)}; missing {sorted(missing)}")
    return {
        str(group): ratio_regression(sub["params"], sub["teacher_fid"], sub["student_fid"], level=level,
                                     cov_type=cov_type)
        for group, sub in pairs.groupby("group", sort=True)
    }


def sweep_pairs(rows: pd.DataFrame, budget: str = "max") -> pd.DataFrame:
    """Pairs from :func:`cmscale.analysis.data.ratio_pairs_sql` rows, labelled ``<method> <k>-step``.

    ``budget='max'`` keeps each (method, preset, seed)'s largest-budget student, the one closest
    to convergence; ``'all'`` keeps every budget and puts the budget in the group label.
    """
    if budget not in ("max", "all"):
        raise ValueError(f"budget must be 'max' or 'all', got {budget!r}")
    if rows.empty:
        return rows.assign(group=pd.Series(dtype=str))
    rows = rows.copy()
    if budget == "max":
        largest = rows.groupby(["method", "preset", "seed"])["budget_flops"].transform("max")
        rows = rows[rows["budget_flops"] == largest]
        rows["group"] = rows["method"] + " " + rows["sampler_steps"].astype(int).astype(str) + "-step"
    else:
        rows["group"] = (rows["method"] + " " + rows["sampler_steps"].astype(int).astype(str) + "-step @ "
                         + rows["budget_flops"].map(lambda b: f"{b:.3g}"))
    return rows.reset_index(drop=True)
