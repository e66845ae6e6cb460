"""The compute-optimal frontier: lower envelope over model sizes, optimal size per budget, N_opt = k C^a.

Input is a point table with one row per eval: ``size`` (a label), ``params`` (N), ``compute``
(training FLOPs C at the eval), ``y`` (FID), ``curve`` (which training trajectory the point belongs
to; runs with the same size and budget but different seeds share a curve and are averaged in log
space) and ``run`` (the resampling unit of the bootstrap).

Envelope
--------
Each curve of size N is read at a budget C by linear interpolation of log y in log C between its
neighbouring points (never extrapolated beyond ``END_TOL``, the one-step shortfall of a run's
last eval against its nominal budget). Size N's value at C is the minimum over its curves
(the best known way to spend C on that size). The frontier is ``y*(C) = min_N y_N(C)``.

Optimal size
------------
At each budget the best size is the argmin over the sizes that reach C. When it is the smallest
or the largest of them (or fewer than three sizes reach C), the true optimum may lie off the grid:
the budget is flagged ``edge`` and excluded from the N_opt fit. Otherwise N_opt is the vertex of the
parabola through the best size and its two neighbours in (log N, log y), as in Chinchilla's
IsoFLOP analysis, clipped to the neighbours' range. The vertex carries a bias of a fraction of the
size grid's step (the curve in log N is not exactly a parabola); the bootstrap CI measures the
noise, not that bias, so use a size grid no coarser than ~2x per step when the CI is tight.

Scaling of N_opt
----------------
``log N_opt = log k + a log C`` by statsmodels OLS on the non-edge budgets, with a clustered
bootstrap CI: each draw resamples runs with replacement within every size, rebuilds the envelope,
recomputes the optima and refits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cmscale.analysis.fit import ols_loglog

# A run stops at floor(budget / FLOPs per step) steps, so its last eval sits up to one step short
# of its nominal budget; a budget this close (relative) past a curve's end reads the end value.
END_TOL = 0.02


def _run_matrix(points: pd.DataFrame, budgets: np.ndarray, end_tol: float = END_TOL) -> tuple[pd.DataFrame, np.ndarray]:
    """Per run: (params, curve) and its log y read at each budget, shape (n_runs, n_budgets).

    A run's trajectory is interpolated linearly in (log C, log y), never extrapolated (NaN outside
    its compute range widened by ``end_tol`` at both ends, where the end value is read); repeated
    compute values within a run are averaged in log y.
    """
    _check_points(points)
    points = points if "run" in points else points.assign(run=points["curve"])
    log_b = np.log(np.asarray(budgets, float))
    meta, rows = [], []
    for (params, curve, run), group in points.groupby(["params", "curve", "run"], sort=True):
        logs = pd.DataFrame({"lc": np.log(group["compute"].to_numpy(float)), "ly": np.log(group["y"].to_numpy(float))})
        logs = logs.groupby("lc", as_index=False)["ly"].mean().sort_values("lc")
        lc, ly = logs["lc"].to_numpy(), logs["ly"].to_numpy()
        slack = math.log1p(end_tol)
        inside = (log_b >= lc[0] - slack) & (log_b <= lc[-1] + slack)
        read = np.full(log_b.shape, np.nan)
        read[inside] = np.interp(log_b[inside], lc, ly)
        meta.append({"params": float(params), "curve": str(curve), "run": str(run)})
        rows.append(read)
    return pd.DataFrame(meta), np.array(rows).reshape(len(meta), len(log_b))


def _curve_blocks(meta: pd.DataFrame) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Sizes (ascending) and, per curve, (index of its size, row numbers of its runs)."""
    sizes = np.sort(meta["params"].unique())
    blocks = []
    for (size, _), group in meta.groupby(["params", "curve"], sort=True):
        blocks.append((int(np.searchsorted(sizes, size)), group.index.to_numpy()))
    return sizes, blocks


def _size_matrix(meta: pd.DataFrame, log_y: np.ndarray, weights: np.ndarray | None = None,
                 blocks=None) -> tuple[np.ndarray, np.ndarray]:
    """Sizes (ascending) and each size's y at each budget: the weighted mean of log y over the runs
    of a curve (seeds), then the minimum over the size's curves."""
    weights = np.ones(len(meta)) if weights is None else np.asarray(weights, float)
    sizes, blocks = _curve_blocks(meta) if blocks is None else blocks
    values = np.full((len(sizes), log_y.shape[1]), np.nan)
    for i, rows in blocks:
        w = weights[rows][:, None]
        block = log_y[rows]
        covered = np.isfinite(block) & (w > 0)
        total = (w * covered).sum(axis=0)
        mean = (np.where(covered, block, 0.0) * w).sum(axis=0) / np.where(total > 0, total, 1.0)
        values[i] = np.fmin(values[i], np.where(total > 0, np.exp(mean), np.nan))
    return sizes, values


def size_values(points: pd.DataFrame, budgets: np.ndarray) -> pd.DataFrame:
    """Each size's interpolated y at each budget: index params, columns budgets (NaN where no
    curve of that size covers the budget)."""
    budgets = np.asarray(budgets, float)
    meta, log_y = _run_matrix(points, budgets)
    sizes, values = _size_matrix(meta, log_y)
    return pd.DataFrame(values, index=sizes, columns=budgets)


def envelope(points: pd.DataFrame, budgets: np.ndarray) -> pd.DataFrame:
    """The frontier y*(C) = min over sizes, with the size that attains it: columns compute, y, params."""
    table = size_values(points, budgets)
    rows = []
    for budget in table.columns:
        column = table[budget].dropna()
        if column.empty:
            continue
        rows.append({"compute": float(budget), "y": float(column.min()), "params": float(column.idxmin())})
    return pd.DataFrame(rows, columns=["compute", "y", "params"])


_OPTIMA_COLUMNS = ["compute", "n_opt", "n_opt_grid", "y_opt", "n_sizes", "edge", "reason"]


def _optima(sizes: np.ndarray, values: np.ndarray, budgets: np.ndarray) -> pd.DataFrame:
    rows = []
    for j, budget in enumerate(budgets):
        ok = np.isfinite(values[:, j])
        if not ok.any():
            continue
        n, ys = sizes[ok], values[ok, j]
        best = int(np.argmin(ys))
        row = {"compute": float(budget), "n_opt_grid": float(n[best]), "y_opt": float(ys[best]),
               "n_sizes": int(len(n)), "edge": False, "reason": ""}
        if len(n) < 3:
            row.update(edge=True, reason=f"only {len(n)} size(s) reach this budget")
        elif best == 0:
            row.update(edge=True, reason="best size is the smallest that reaches this budget")
        elif best == len(n) - 1:
            row.update(edge=True, reason="best size is the largest that reaches this budget")
        row["n_opt"] = float(n[best]) if row["edge"] else _parabola_vertex(np.log(n[best - 1 : best + 2]),
                                                                           np.log(ys[best - 1 : best + 2]))
        rows.append(row)
    return pd.DataFrame(rows, columns=_OPTIMA_COLUMNS)


def _inner_optima(sizes: np.ndarray, values: np.ndarray, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-edge budgets and their N_opt, without building a table (the bootstrap's hot path);
    same rules as :func:`_optima`."""
    compute, n_opt = [], []
    for j, budget in enumerate(budgets):
        ok = np.isfinite(values[:, j])
        if ok.sum() < 3:
            continue
        n, ys = sizes[ok], values[ok, j]
        best = int(np.argmin(ys))
        if 0 < best < len(n) - 1:
            compute.append(budget)
            n_opt.append(_parabola_vertex(np.log(n[best - 1 : best + 2]), np.log(ys[best - 1 : best + 2])))
    return np.array(compute), np.array(n_opt)


def optimal_sizes(points: pd.DataFrame, budgets: np.ndarray) -> pd.DataFrame:
    """Optimal size per budget: columns compute, n_opt, n_opt_grid, y_opt, n_sizes, edge, reason."""
    budgets = np.asarray(budgets, float)
    meta, log_y = _run_matrix(points, budgets)
    sizes, values = _size_matrix(meta, log_y)
    return _optima(sizes, values, budgets)


def _parabola_vertex(log_n: np.ndarray, log_y: np.ndarray) -> float:
    """exp of the vertex of the parabola through three (log N, log y) points, clipped to their range."""
    (x0, x1, x2), (y0, y1, y2) = log_n, log_y
    # divided differences: y = y0 + d01 (x - x0) + curvature (x - x0)(x - x1)
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    curvature = (d12 - d01) / (x2 - x0)
    slope = d01 - curvature * (x0 + x1)
    if curvature <= 0:  # a best middle point always gives curvature > 0; guard against ties
        return float(math.exp(log_n[1]))
    return float(math.exp(np.clip(-slope / (2 * curvature), log_n[0], log_n[-1])))


def _check_points(points: pd.DataFrame) -> None:
    missing = {"size", "params", "compute", "y", "curve"} - set(points.columns)
    if missing:
        raise ValueError(f"frontier points need columns size, params, compute, y, curve; missing {sorted(missing)}")
    for column in ("params", "compute", "y"):
        values = points[column].to_numpy(float)
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"frontier column {column!r} must be finite and > 0")


def default_budgets(points: pd.DataFrame, column: str = "budget_flops") -> np.ndarray:
    """The sweep's iso-FLOP budgets when the table has them, else 12 log-spaced values over the
    compute range."""
    if column in points and points[column].notna().any():
        return np.sort(points[column].dropna().unique().astype(float))
    lo, hi = float(points["compute"].min()), float(points["compute"].max())
    return np.logspace(math.log10(lo), math.log10(hi), 12)


@dataclass
class OptimalSizeFit:
    """``N_opt = k C^a`` fitted on the non-edge budgets."""

    k: float
    a: float
    n_points: int
    status: str
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    ols: dict | None = None
    n_draws: int = 0
    n_draws_used: int = 0
    draws: np.ndarray | None = field(default=None, repr=False)

    def predict(self, compute: np.ndarray) -> np.ndarray:
        return self.k * np.asarray(compute, float) ** self.a

    def band(self, compute: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        if self.draws is None or not len(self.draws):
            nan = np.full(np.shape(compute), np.nan)
            return nan, nan
        curves = self.draws[:, :1] * np.asarray(compute, float)[None, :] ** self.draws[:, 1:2]
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(curves, [tail, 100 - tail], axis=0)
        return lo, hi

    def to_json(self) -> dict:
        return {"k": self.k, "a": self.a, "ci": {n: [float(lo), float(hi)] for n, (lo, hi) in self.ci.items()},
                "status": self.status, "n_points": self.n_points, "n_draws": self.n_draws,
                "n_draws_used": self.n_draws_used, "ols": self.ols}


def _loglog_line(compute: np.ndarray, n_opt: np.ndarray) -> tuple[float, float]:
    """Least-squares line through (log C, log N_opt): returns (k, a)."""
    lc, ln = np.log(np.asarray(compute, float)), np.log(np.asarray(n_opt, float))
    lc_c = lc - lc.mean()
    slope = float((lc_c * (ln - ln.mean())).sum() / (lc_c * lc_c).sum())
    return float(math.exp(ln.mean() - slope * lc.mean())), slope


def fit_optimal_size(
    points: pd.DataFrame,
    budgets: np.ndarray | None = None,
    *,
    n_draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[pd.DataFrame, OptimalSizeFit | None]:
    """Optimal sizes per budget and the fit ``N_opt = k C^a`` with a clustered bootstrap CI.

    Returns (optima table, fit); the fit is None when fewer than 2 budgets are not at the edge.
    ``points`` needs a ``run`` column for the bootstrap (the resampling unit).
    """
    budgets = default_budgets(points) if budgets is None else np.asarray(budgets, float)
    optima = optimal_sizes(points, budgets)
    inner = optima[~optima["edge"]]
    if len(inner) < 2:
        return optima, None
    k, a = _loglog_line(inner["compute"].to_numpy(), inner["n_opt"].to_numpy())
    result = OptimalSizeFit(k=k, a=a, n_points=len(inner), status="ok")
    if len(inner) >= 3:
        # ols_loglog fits y = A x^-alpha; N_opt = k C^a has alpha = -a
        ols = ols_loglog(inner["compute"], inner["n_opt"], level=level)
        result.ols = {"k": ols["A"], "a": -ols["alpha"], "se_a": ols["se_alpha"], "p_a": ols["p_alpha"],
                      "r2": ols["r2"],
                      "ci": {"k": ols["ci"]["A"], "a": [-ols["ci"]["alpha"][1],
                                                        -ols["ci"]["alpha"][0]]}, "cov_type": ols["cov_type"]}
    else:
        result.status = "two_points"
    if n_draws > 0:
        draws = _bootstrap_optimal_size(points, budgets, n_draws, seed)
        result.n_draws, result.n_draws_used = n_draws, len(draws)
        if len(draws):
            result.draws = draws
            tail = 100 * (1 - level) / 2
            for j, name in enumerate(("k", "a")):
                lo, hi = np.percentile(draws[:, j], [tail, 100 - tail])
                result.ci[name] = (float(lo), float(hi))
    return optima, result


def _bootstrap_optimal_size(points: pd.DataFrame, budgets: np.ndarray, n_draws: int, seed: int) -> np.ndarray:
    """(k, a) per draw: runs resampled with replacement within each size (as integer weights);
    draws with fewer than 2 non-edge budgets are dropped (the caller reports how many were used)."""
    rng = np.random.default_rng(seed)
    meta, log_y = _run_matrix(points, budgets)
    members = [np.flatnonzero((meta["params"] == size).to_numpy()) for size in np.sort(meta["params"].unique())]
    blocks = _curve_blocks(meta)
    out = []
    for _ in range(n_draws):
        weights = np.zeros(len(meta))
        for rows in members:
            np.add.at(weights, rng.choice(rows, size=len(rows), replace=True), 1.0)
        sizes, values = _size_matrix(meta, log_y, weights, blocks)
        compute, n_opt = _inner_optima(sizes, values, budgets)
        if len(compute) >= 2:
            out.append(_loglog_line(compute, n_opt))
    return np.array(out, dtype=float).reshape(-1, 2)


def frontier_line(points: pd.DataFrame, num: int = 80) -> pd.DataFrame:
    """The envelope on a dense log grid over the compute range, for plotting: columns x, y, params."""
    lo, hi = float(points["compute"].min()), float(points["compute"].max())
    grid = np.logspace(math.log10(lo), math.log10(hi), num)
    line = envelope(points, grid)
    return line.rename(columns={"compute": "x"})
