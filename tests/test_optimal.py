"""Compute-optimal sizes (cmscale.analysis.optimal): edge optima excluded with the reason, bootstraps over runs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from law_tables import isoflop_table

from cmscale.analysis.fit import evaluate_law
from cmscale.analysis.frontier import compute_grid, frontier_law
from cmscale.analysis.optimal import compute_optimal
from cmscale.analysis.synthetic import JOINT_TRUTH


def test_edge_optima_are_excluded_and_too_few_interior_budgets_say_why():
    sizes = np.logspace(5, 10, 11)
    table = isoflop_table(sizes, np.logspace(9, 12, 4))  # tiny budgets: the smallest size always wins
    points = table.rename(columns={"N": "params", "C": "compute", "fid": "y"})
    result = compute_optimal(points, n_draws=20)
    assert not result.optima["interior"].any()
    assert result.optima["reason"].str.contains("smallest").all()
    assert result.isoflop.a is None and "0 budgets with an interior optimum (need >= 3)" in result.isoflop.reason
    assert result.isoflop.to_json()["ci"] is None


def test_bootstraps_resample_runs_not_evals():
    sizes, budgets = np.logspace(6, 9, 10), np.logspace(15, 19, 5)
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        for b in budgets:  # each run evaluated at 4 fractions of its budget
            for f in (0.125, 0.25, 0.5, 1.0):
                y = evaluate_law("joint", JOINT_TRUTH, n, f * b / (6 * n)) * math.exp(rng.normal(0, 0.01))
                rows.append({"run": f"{n:.3g}@{b:.3g}", "params": n, "compute": f * b, "y": y})
    points = pd.DataFrame(rows)
    n_runs = len(sizes) * len(budgets)
    result = compute_optimal(points, budgets, n_draws=50)
    assert result.n_runs == n_runs and result.isoflop.n_groups == n_runs and result.envelope_fit.n_groups == n_runs
    choice, env = frontier_law(points, n_draws=50)
    assert (
        choice.n_groups == n_runs and choice.kept.bootstrap.n_groups == n_runs and choice.kept.bootstrap.n_draws == 50
    )
    # the frontier lives on the grid (minus gaps no run covers), not on every eval
    assert set(env["compute"]) <= set(compute_grid(points)) and len(env) < len(points)
