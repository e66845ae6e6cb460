"""Synthetic data from known laws, for recovery tests, CI coverage studies and the fit benchmark.

Noise is multiplicative, ``y = law * exp(eps)`` with ``eps ~ N(0, noise^2)``, the error model the
default ``log`` loss assumes. Points come in runs (the bootstrap's resampling unit): each run is
one model size trained to one budget and evaluated at a few fractions of it, as in a sweep, but
with independent noise per eval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmscale.analysis.fit import evaluate_law, fit_with_bootstrap

SATURATING_TRUTH = {"E": 2.0, "A": 2.0e5, "alpha": 0.5}
JOINT_TRUTH = {"E": 1.8, "A": 400.0, "B": 2.0e4, "alpha": 0.3, "beta": 0.4}


@dataclass
class SyntheticData:
    form: str
    X: list[np.ndarray]
    y: np.ndarray
    groups: np.ndarray
    truth: dict[str, float]


def saturating_data(n_runs: int = 20, evals_per_run: int = 3, noise: float = 0.03, seed: int = 0,
                    truth: dict[str, float] | None = None, x_range: tuple[float, float] = (1e10,
                                                                                           1e14)) -> SyntheticData:
    """``y = E + A x^-alpha`` at ``n_runs * evals_per_run`` log-spaced x; consecutive points share a run."""
    truth = dict(SATURATING_TRUTH if truth is None else truth)
    rng = np.random.default_rng(seed)
    n = n_runs * evals_per_run
    x = np.logspace(np.log10(x_range[0]), np.log10(x_range[1]), n)
    y = evaluate_law("saturating", truth, x) * np.exp(rng.normal(0.0, noise, n))
    return SyntheticData("saturating", [x], y, np.repeat(np.arange(n_runs), evals_per_run), truth)


def joint_data(n_sizes: int = 10, n_budgets: int = 5, evals_per_run: int = 5, noise: float = 0.03, seed: int = 0,
               truth: dict[str, float] | None = None) -> SyntheticData:
    """``y = E + A N^-alpha + B D^-beta`` on a grid of sizes (1e6..1e9) x budgets (runs), each run
    evaluated at ``evals_per_run`` fractions of its images (D from 1e8 to 1e11 overall)."""
    truth = dict(JOINT_TRUTH if truth is None else truth)
    rng = np.random.default_rng(seed)
    sizes = np.logspace(6, 9, n_sizes)
    finals = np.logspace(9, 11, n_budgets)
    fractions = np.logspace(-1, 0, evals_per_run)
    N, D, groups = [], [], []
    run = 0
    for n in sizes:
        for d in finals:
            N.extend([n] * evals_per_run)
            D.extend(d * fractions)
            groups.extend([run] * evals_per_run)
            run += 1
    N, D = np.array(N), np.array(D)
    y = evaluate_law("joint", truth, N, D) * np.exp(rng.normal(0.0, noise, N.size))
    return SyntheticData("joint", [N, D], y, np.array(groups), truth)


def _one_replicate(form: str, replicate: int, noise: float, n_draws: int, data_kwargs: dict) -> dict:
    make = saturating_data if form == "saturating" else joint_data
    data = make(noise=noise, seed=10_000 + replicate, **data_kwargs)
    fit = fit_with_bootstrap(form, data.X, data.y, data.groups, n_draws=n_draws, seed=replicate, n_jobs=1)
    out = {"status": fit.status}
    for name, value in data.truth.items():
        lo, hi = fit.ci.get(name, (np.nan, np.nan))
        out[name] = {"estimate": fit.params[name], "covered": bool(lo <= value <= hi)}
    return out


def coverage_study(form: str, n_replicates: int, *, noise: float = 0.03, n_draws: int = 200, n_jobs: int = 1,
                   **data_kwargs) -> dict:
    """Fraction of seeded replicates whose bootstrap 95% CI covers each true parameter, plus the
    estimates' bias and spread. Replicates run in ``n_jobs`` processes (each fit single-process)."""
    if n_jobs > 1:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs)(delayed(_one_replicate)(form, r, noise, n_draws,
                                                                  data_kwargs) for r in range(n_replicates))
    else:
        results = [_one_replicate(form, r, noise, n_draws, data_kwargs) for r in range(n_replicates)]
    truth = SATURATING_TRUTH if form == "saturating" else JOINT_TRUTH
    summary = {"form": form, "n_replicates": n_replicates, "noise": noise, "n_draws": n_draws,
               "statuses": {s: sum(r["status"] == s for r in results) for s in {r["status"] for r in results}}}
    for name, value in truth.items():
        estimates = np.array([r[name]["estimate"] for r in results])
        summary[name] = {"truth": value, "coverage": float(np.mean([r[name]["covered"] for r in results])),
                         "median_estimate": float(np.median(estimates)), "std_estimate": float(np.std(estimates))}
    return summary
