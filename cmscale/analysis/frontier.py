"""The compute-optimal frontier: runs read on a compute grid, the lower envelope over runs, the
law fitted to it, and the iso-FLOP optima (``N_opt = k C^a`` from them: :mod:`cmscale.analysis.optimal`).

Input is a point table, one row per eval: ``run`` (one training trajectory, the resampling unit
of the bootstrap), ``params`` (N), ``compute`` (training FLOPs C at the eval) and ``y`` (FID);
an optional ``size`` labels the sizes. An iso-FLOP table (one row per run, each run trained to
its budget) is the special case of one eval per run.

Reading runs on a grid
----------------------
Each run's trajectory is interpolated linearly in (log C, log y) within the compute range it
covers and never extrapolated; only ``END_TOL`` (a run stops up to one step short of its nominal
budget) widens the range, where the end value is read.

Envelope (Chinchilla approach 1)
--------------------------------
On a common log-spaced compute grid the frontier is ``y*(C) = min over runs`` of the runs'
interpolated values, and the size of the winning run is the envelope's N(C). An envelope point is
interior when that size is neither the smallest nor the largest of the sizes reaching C (and at
least 3 do); ``log N = log k + a log C`` is fitted on the interior points.

Iso-FLOP profiles (Chinchilla approach 2)
-----------------------------------------
At each budget C every size's value is its best run *trained to* C: the run's final eval, when
that lies within ``BUDGET_TOL`` of C. A longer run's mid-run eval is not a run of budget C when
the schedule depends on the run's length (ECT's stages, a cosine lr): it is read by the envelope
(approach 1) only. N_opt(C) is the vertex of the
parabola in (log N, log y) through the best size and its two neighbours. When the best size is
the smallest or the largest reaching C (or fewer than 3 sizes reach C) the optimum may lie off
the grid: the budget is flagged as an edge and excluded. The vertex carries a bias of a fraction
of the size grid's step (the profile is not exactly a parabola); the bootstrap measures noise,
not that bias, so use a size grid no coarser than ~2x per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cmscale.analysis.data import check_positive
from cmscale.analysis.fit import MIN_CI_GROUPS

# A run stops at floor(budget / FLOPs per step) steps, so its last eval sits up to one step short
# of its nominal budget; a budget this close (relative) past a run's end reads the end value.
END_TOL = 0.02
# A run of few steps ends up to one step away from its nominal budget (ECT t16 at 3e10 FLOPs: 17
# steps, 2.3% over); budgets of one sweep lie much further apart than this.
BUDGET_TOL = 0.1
GRID_POINTS_PER_DECADE = 6
REQUIRED_COLUMNS = ("run", "params", "compute", "y")


def check_points(points: pd.DataFrame, source: str = "frontier points") -> pd.DataFrame:
    """Validate a point table; returns it with a ``size`` column (from params when absent)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in points.columns]
    if missing:
        raise ValueError(f"{source}: need columns {list(REQUIRED_COLUMNS)}; missing {missing}")
    if points.empty:
        raise ValueError(f"{source}: no rows")
    check_positive(points, source, "params", "compute", "y")
    sizes_per_run = points.groupby("run")["params"].nunique()
    if (sizes_per_run > 1).any():
        raise ValueError(
            f"{source}: run {sizes_per_run[sizes_per_run > 1].index[0]!r} has several sizes; a run is one model"
        )
    if "size" not in points:
        points = points.assign(size=points["params"].map(lambda n: f"{float(n):.3g}"))
    return points


def compute_grid(points: pd.DataFrame, per_decade: int = GRID_POINTS_PER_DECADE) -> np.ndarray:
    """A log-spaced grid over the compute range of the table (both ends included)."""
    lo, hi = float(points["compute"].min()), float(points["compute"].max())
    if hi <= lo:
        return np.array([lo])
    num = max(2, int(math.ceil(per_decade * math.log10(hi / lo))) + 1)
    return np.logspace(math.log10(lo), math.log10(hi), num)


def default_budgets(points: pd.DataFrame) -> np.ndarray:
    """Budgets for the iso-FLOP profiles: the runs' final computes, merged when within ``BUDGET_TOL``."""
    final = points.groupby("run")["compute"].max().to_numpy(float)
    values = np.sort(np.log(final))
    clusters, current = [], [values[0]]
    for value in values[1:]:
        if value - current[0] > math.log1p(BUDGET_TOL):
            clusters.append(current)
            current = []
        current.append(value)
    clusters.append(current)
    return np.array([math.exp(float(np.mean(c))) for c in clusters])


@dataclass
class Trajectories:
    """Every run's log y read on a compute grid: ``log_y[i, j]`` is run i at ``grid[j]`` (NaN
    where the run does not reach)."""

    runs: pd.DataFrame  # columns run, params, size; row i belongs to log_y[i]
    grid: np.ndarray
    log_y: np.ndarray
    size_index: np.ndarray  # run row -> index into sizes
    sizes: np.ndarray  # ascending params

    @property
    def n_runs(self) -> int:
        return len(self.runs)

    @property
    def run_params(self) -> np.ndarray:
        return self.runs["params"].to_numpy(float)


def read_runs(
    points: pd.DataFrame, grid: np.ndarray, end_tol: float = END_TOL, ends_only: bool = False
) -> Trajectories:
    """Interpolate each run in (log C, log y) at ``grid``, within its own compute range only;
    repeated compute values within a run are averaged in log y. With ``ends_only`` a run is read
    only at the grid points within ``BUDGET_TOL`` of its final compute, as its final value (the
    budgets it was trained to)."""
    points = check_points(points)
    log_grid = np.log(np.asarray(grid, float))
    slack = math.log1p(end_tol)
    codes, names = pd.factorize(points["run"].astype(str), sort=True)
    lc_all, ly_all = np.log(points["compute"].to_numpy(float)), np.log(points["y"].to_numpy(float))
    order = np.lexsort((lc_all, codes))
    codes, lc_all, ly_all = codes[order], lc_all[order], ly_all[order]
    first = np.searchsorted(codes, np.arange(len(names)))
    params = points["params"].to_numpy(float)[order][first]
    size_labels = points["size"].astype(str).to_numpy()[order][first]
    rows = np.full((len(names), len(log_grid)), np.nan)
    for i, (lc, ly) in enumerate(zip(np.split(lc_all, first[1:]), np.split(ly_all, first[1:]))):
        if np.any(np.diff(lc) == 0):  # repeated compute values within a run: mean of log y
            lc, inverse = np.unique(lc, return_inverse=True)
            ly = np.bincount(inverse, weights=ly) / np.bincount(inverse)
        if ends_only:
            rows[i, np.abs(log_grid - lc[-1]) <= math.log1p(BUDGET_TOL)] = ly[-1]
            continue
        inside = (log_grid >= lc[0] - slack) & (log_grid <= lc[-1] + slack)
        rows[i, inside] = np.interp(log_grid[inside], lc, ly)
    runs = pd.DataFrame({"run": np.asarray(names, dtype=object), "params": params, "size": size_labels})
    sizes = np.sort(np.unique(params))
    return Trajectories(runs, np.asarray(grid, float), rows, np.searchsorted(sizes, params), sizes)


def _present_log_y(traj: Trajectories, present: np.ndarray | None) -> np.ndarray:
    return traj.log_y if present is None else np.where(present[:, None], traj.log_y, np.nan)


def envelope_rows(traj: Trajectories, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per grid point: index of the best run (-1 where none reaches) and its log y."""
    log_y = _present_log_y(traj, present)
    filled = np.where(np.isfinite(log_y), log_y, np.inf)
    best = np.argmin(filled, axis=0)
    best_value = filled[best, np.arange(filled.shape[1])]
    reached = np.isfinite(best_value)
    return np.where(reached, best, -1), np.where(reached, best_value, np.nan)


def size_profiles(traj: Trajectories, present: np.ndarray | None = None) -> np.ndarray:
    """Each size's best log y at each grid point, shape (n_sizes, n_grid); NaN where no run of the size reaches."""
    log_y = _present_log_y(traj, present)
    values = np.full((len(traj.sizes), log_y.shape[1]), np.nan)
    for i in range(len(traj.sizes)):
        block = log_y[traj.size_index == i]
        if block.size:
            lowest = np.min(np.where(np.isfinite(block), block, np.inf), axis=0)
            values[i] = np.where(np.isfinite(lowest), lowest, np.nan)
    return values


def _edge_reason(n_reaching: int, best: int) -> str:
    if n_reaching < 3:
        return f"only {n_reaching} size(s) reach this compute"
    if best == 0:
        return "best size is the smallest that reaches this compute"
    if best == n_reaching - 1:
        return "best size is the largest that reaches this compute"
    return ""


def envelope(points: pd.DataFrame, grid: np.ndarray | None = None) -> pd.DataFrame:
    """The lower envelope over runs on ``grid`` (default: :func:`compute_grid`).

    Columns: compute, y, run, params, size (of the winning run), n_runs and n_sizes (reaching
    C), interior (the winning size is neither the smallest nor the largest reaching C), reason.
    """
    points = check_points(points)
    grid = compute_grid(points) if grid is None else np.asarray(grid, float)
    traj = read_runs(points, grid)
    return envelope_table(traj)


def envelope_table(traj: Trajectories) -> pd.DataFrame:
    best, best_log = envelope_rows(traj)
    profiles = size_profiles(traj)
    rows = []
    for j, compute in enumerate(traj.grid):
        if best[j] < 0:
            continue
        run = traj.runs.iloc[best[j]]
        reaching = np.flatnonzero(np.isfinite(profiles[:, j]))
        position = int(np.searchsorted(traj.sizes[reaching], run["params"]))
        reason = _edge_reason(len(reaching), position)
        rows.append(
            {
                "compute": float(compute),
                "y": float(math.exp(best_log[j])),
                "run": run["run"],
                "params": run["params"],
                "size": run["size"],
                "n_runs": int(np.isfinite(traj.log_y[:, j]).sum()),
                "n_sizes": len(reaching),
                "interior": not reason,
                "reason": reason,
            }
        )
    return pd.DataFrame(
        rows, columns=["compute", "y", "run", "params", "size", "n_runs", "n_sizes", "interior", "reason"]
    )


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


def isoflop_rows(traj: Trajectories, present: np.ndarray | None = None) -> list[dict]:
    profiles = size_profiles(traj, present)
    rows = []
    for j, budget in enumerate(traj.grid):
        ok = np.flatnonzero(np.isfinite(profiles[:, j]))
        if not len(ok):
            continue
        log_n, log_y = np.log(traj.sizes[ok]), profiles[ok, j]
        best = int(np.argmin(log_y))
        reason = _edge_reason(len(ok), best)
        n_opt = (
            math.exp(log_n[best])
            if reason
            else _parabola_vertex(log_n[best - 1 : best + 2], log_y[best - 1 : best + 2])
        )
        rows.append(
            {
                "compute": float(budget),
                "n_opt": n_opt,
                "n_best": float(traj.sizes[ok][best]),
                "y_best": float(math.exp(log_y[best])),
                "n_sizes": len(ok),
                "interior": not reason,
                "reason": reason,
            }
        )
    return rows


def isoflop_optima(points: pd.DataFrame, budgets: np.ndarray | None = None) -> pd.DataFrame:
    """Optimal size per budget from iso-FLOP profiles. Columns: compute, n_opt (parabola vertex,
    or the best grid size at an edge), n_best (best grid size), y_best, n_sizes, interior, reason."""
    points = check_points(points)
    budgets = default_budgets(points) if budgets is None else np.asarray(budgets, float)
    return pd.DataFrame(
        isoflop_rows(read_runs(points, budgets, ends_only=True)),
        columns=["compute", "n_opt", "n_best", "y_best", "n_sizes", "interior", "reason"],
    )


ONE_RUN_PER_SIZE = "one run per size: resampling runs within sizes cannot vary the data; estimate without CI"


def resampling_varies(traj: Trajectories) -> bool:
    return bool(np.bincount(traj.size_index).max() > 1)


def resample_runs(traj: Trajectories, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap draw as a run mask: the runs of every size drawn with replacement (the
    profiles and the envelope take minima, so only whether a run was drawn matters)."""
    present = np.zeros(traj.n_runs, bool)
    for i in range(len(traj.sizes)):
        rows = np.flatnonzero(traj.size_index == i)
        present[rng.choice(rows, size=len(rows), replace=True)] = True
    return present


def envelope_draws(
    points: pd.DataFrame, grid: np.ndarray, n_draws: int, seed: int = 0
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """The envelope rebuilt from ``n_draws`` run resamples: a list of (compute, y) on the grid
    points each draw reaches, and the number of runs (the bootstrap's groups)."""
    traj = read_runs(points, grid)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_draws):
        best, best_log = envelope_rows(traj, resample_runs(traj, rng))
        keep = best >= 0
        out.append((traj.grid[keep], np.exp(best_log[keep])))
    return out, traj.n_runs


def frontier_law(
    points: pd.DataFrame,
    grid: np.ndarray | None = None,
    *,
    n_draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    variable: str = "C",
    form: str = "saturating",
    **fit_kwargs,
):
    """The saturating law ``y = E + A C^-alpha`` (or its nested pure law, see
    :func:`cmscale.analysis.selection.select_law`; ``form`` and ``fit_kwargs`` go to it) fitted to
    the envelope on ``grid``, with a CI from the bootstrap over runs (each draw rebuilds the
    envelope). Returns (LawChoice, envelope)."""
    from cmscale.analysis.fit import bootstrap_datasets
    from cmscale.analysis.selection import select_law

    points = check_points(points)
    grid = compute_grid(points) if grid is None else np.asarray(grid, float)
    table = envelope(points, grid)
    choice = select_law(
        form,
        [table["compute"].to_numpy(float)],
        table["y"].to_numpy(float),
        None,
        n_draws=0,
        variables={"A": variable},
        **fit_kwargs,
    )
    n_runs = int(points["run"].nunique())
    choice.n_groups = n_runs
    if choice.kept is None or n_draws <= 0:
        return choice, table
    if n_runs < MIN_CI_GROUPS:
        choice.ci_note = f"{n_runs} run(s): estimate without CI (a CI needs >= {MIN_CI_GROUPS} independent runs)"
        return choice, table
    if points.groupby("params")["run"].nunique().max() < 2:
        choice.ci_note = ONE_RUN_PER_SIZE
        return choice, table
    draws, _ = envelope_draws(points, grid, n_draws, seed)
    bootstrap_datasets(choice.kept, [([c], y) for c, y in draws], n_runs, seed=seed, level=level)
    return choice, table
