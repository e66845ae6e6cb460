"""The compute-optimal size N_opt(C) = k C^a, by iso-FLOP profiles and by the lower envelope
(the optima themselves: :mod:`cmscale.analysis.frontier`).

N_opt = k C^a
-------------
By log-log least squares, only when at least ``MIN_INTERIOR_BUDGETS`` budgets have an interior
optimum (otherwise the reason is stated). The CI comes from a bootstrap over runs: each draw
resamples the runs of every size with replacement, rebuilds the profiles (or the envelope),
recomputes the optima and refits; ``n_groups`` is the number of runs. A CI needs at least
``MIN_CI_GROUPS`` independent runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cmscale.analysis.fit import MIN_CI_GROUPS, ols_loglog
from cmscale.analysis.frontier import (
    ONE_RUN_PER_SIZE,
    Trajectories,
    check_points,
    compute_grid,
    default_budgets,
    envelope_rows,
    envelope_table,
    isoflop_rows,
    read_runs,
    resample_runs,
    resampling_varies,
    size_profiles,
)

MIN_INTERIOR_BUDGETS = 3


@dataclass
class NOptFit:
    """``N_opt = k C^a`` from one approach; ``a`` is None when not fitted, with ``reason``.
    ``ci_reason`` says why a fitted exponent has no CI."""

    approach: str
    n_budgets: int
    a: float | None = None
    k: float | None = None
    reason: str = ""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    ci_reason: str = ""
    ols: dict | None = None
    n_draws: int = 0
    n_draws_used: int = 0
    n_groups: int = 0
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
        return {
            "approach": self.approach,
            "a": self.a,
            "k": self.k,
            "n_budgets": self.n_budgets,
            "ci": {n: [float(lo), float(hi)] for n, (lo, hi) in self.ci.items()} or None,
            "reason": self.reason or None,
            "ci_reason": self.ci_reason or None,
            "ols": self.ols,
            "bootstrap": {"n_draws": self.n_draws, "n_draws_used": self.n_draws_used, "n_groups": self.n_groups},
        }


def _loglog_line(compute: np.ndarray, n_opt: np.ndarray) -> tuple[float, float]:
    """Least-squares line through (log C, log N_opt): returns (k, a)."""
    lc, ln = np.log(np.asarray(compute, float)), np.log(np.asarray(n_opt, float))
    lc_c = lc - lc.mean()
    slope = float((lc_c * (ln - ln.mean())).sum() / (lc_c * lc_c).sum())
    return float(math.exp(ln.mean() - slope * lc.mean())), slope


def _interior_isoflop(traj: Trajectories, present: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in isoflop_rows(traj, present) if r["interior"]]
    return np.array([r["compute"] for r in rows]), np.array([r["n_opt"] for r in rows])


def _interior_envelope(traj: Trajectories, present: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    best, _ = envelope_rows(traj, present)
    profiles = size_profiles(traj, present)
    compute, n_env = [], []
    for j in np.flatnonzero(best >= 0):
        reaching = traj.sizes[np.isfinite(profiles[:, j])]
        size = traj.run_params[best[j]]
        if len(reaching) >= 3 and reaching[0] < size < reaching[-1]:
            compute.append(traj.grid[j])
            n_env.append(size)
    return np.array(compute), np.array(n_env)


def _fit_n_opt(
    approach: str, traj: Trajectories, interior, what: str, n_draws: int, seed: int, level: float
) -> NOptFit:
    compute, n_opt = interior(traj, None)
    result = NOptFit(approach, n_budgets=len(compute), n_groups=traj.n_runs)
    if len(compute) < MIN_INTERIOR_BUDGETS:
        result.reason = (
            f"not identifiable from these runs: {len(compute)} {what} with an interior optimum "
            f"(need >= {MIN_INTERIOR_BUDGETS}); the best size sits at the edge of the size grid elsewhere"
        )
        return result
    if len(np.unique(n_opt)) < 2:
        result.reason = (
            f"not identifiable from these runs: every interior {what[:-1]} picks the same size ({n_opt[0]:.3g})"
        )
        return result
    result.k, result.a = _loglog_line(compute, n_opt)
    ols = ols_loglog(compute, n_opt, level=level)  # fits y = A x^-alpha, so a = -alpha
    result.ols = {
        "a": -ols["alpha"],
        "ci_a": [-ols["ci"]["alpha"][1], -ols["ci"]["alpha"][0]],
        "r2": ols["r2"],
        "cov_type": ols["cov_type"],
        "note": "treats budgets as independent; the run bootstrap CI does not",
    }
    if traj.n_runs < MIN_CI_GROUPS:
        result.ci_reason = f"{traj.n_runs} run(s): estimate without CI (a CI needs >= {MIN_CI_GROUPS} independent runs)"
        return result
    if n_draws <= 0:
        result.ci_reason = "no bootstrap draws requested"
        return result
    if not resampling_varies(traj):
        result.ci_reason = ONE_RUN_PER_SIZE
        return result
    draws = _bootstrap_runs(traj, interior, n_draws, seed)
    result.n_draws, result.n_draws_used = n_draws, len(draws)
    if len(draws) < 0.5 * n_draws:
        result.ci_reason = (
            f"only {len(draws)}/{n_draws} draws keep >= 2 interior {what}: unstable under resampling runs"
        )
        return result
    result.draws = draws
    tail = 100 * (1 - level) / 2
    for j, name in enumerate(("k", "a")):
        lo, hi = np.percentile(draws[:, j], [tail, 100 - tail])
        result.ci[name] = (float(lo), float(hi))
    return result


def _bootstrap_runs(traj: Trajectories, interior, n_draws: int, seed: int) -> np.ndarray:
    """(k, a) per draw; draws with fewer than 2 interior budgets (no slope) are dropped and counted."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_draws):
        compute, n_opt = interior(traj, resample_runs(traj, rng))
        if len(compute) >= 2 and len(np.unique(n_opt)) >= 2:
            out.append(_loglog_line(compute, n_opt))
    return np.array(out, dtype=float).reshape(-1, 2)


@dataclass
class ComputeOptimal:
    """Both approaches to the compute-optimal size, side by side."""

    optima: pd.DataFrame  # iso-FLOP profiles, one row per budget
    envelope: pd.DataFrame  # the envelope on the grid, one row per grid compute
    isoflop: NOptFit
    envelope_fit: NOptFit
    n_runs: int
    n_sizes: int

    def to_json(self) -> dict:
        return {
            "n_runs": self.n_runs,
            "n_sizes": self.n_sizes,
            "isoflop": {"optima": self.optima.to_dict(orient="records"), "n_opt_fit": self.isoflop.to_json()},
            "envelope": {"points": self.envelope.to_dict(orient="records"), "n_opt_fit": self.envelope_fit.to_json()},
        }


def compute_optimal(
    points: pd.DataFrame,
    budgets: np.ndarray | None = None,
    grid: np.ndarray | None = None,
    *,
    n_draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ComputeOptimal:
    """Compute-optimal size by iso-FLOP profiles at ``budgets`` (default :func:`default_budgets`)
    and by the envelope on ``grid`` (default :func:`compute_grid`), each with ``N_opt = k C^a``
    and a bootstrap over runs."""
    points = check_points(points)
    budgets = default_budgets(points) if budgets is None else np.asarray(budgets, float)
    grid = compute_grid(points) if grid is None else np.asarray(grid, float)
    at_budgets, on_grid = read_runs(points, budgets, ends_only=True), read_runs(points, grid)
    optima = pd.DataFrame(
        isoflop_rows(at_budgets), columns=["compute", "n_opt", "n_best", "y_best", "n_sizes", "interior", "reason"]
    )
    return ComputeOptimal(
        optima=optima,
        envelope=envelope_table(on_grid),
        isoflop=_fit_n_opt("iso-FLOP profiles", at_budgets, _interior_isoflop, "budgets", n_draws, seed, level),
        envelope_fit=_fit_n_opt("envelope", on_grid, _interior_envelope, "grid points", n_draws, seed, level),
        n_runs=at_budgets.n_runs,
        n_sizes=len(at_budgets.sizes),
    )
