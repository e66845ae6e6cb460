"""The compute frontier (cmscale.analysis.frontier): the envelope over runs and iso-FLOP optima, against
known truths."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cmscale.analysis.frontier import envelope, isoflop_optima


def _run(run, n, c, y):
    return [{"run": run, "params": n, "compute": ci, "y": yi} for ci, yi in zip(c, y)]


def test_envelope_is_the_lower_envelope_over_crossing_runs():
    c = np.logspace(10, 13, 7)
    # a: 10 x^-0.2 (C <= 1e12), b: 30 x^-0.5 (all C), w: a bad large model, x = C / 1e10; a and b cross at x = 3^(1/0.3)
    curves = {
        "a": (1e5, 10 * (c / 1e10) ** -0.2, c <= 1e12),
        "b": (1e6, 30 * (c / 1e10) ** -0.5, c > 0),
        "w": (1e7, 500 * (c / 1e10) ** -0.1, c >= 1e11),
    }
    points = pd.DataFrame([row for run, (n, y, keep) in curves.items() for row in _run(run, n, c[keep], y[keep])])
    grid = np.logspace(10, 14, 41)
    env = envelope(points, grid)
    assert len(env) == 31 and env["compute"].max() == pytest.approx(1e13)  # one row per grid point; none past every run
    x = env["compute"].to_numpy() / 1e10
    # every run is an exact power law, so its log-log interpolation is exact wherever it has evals
    closed = np.vstack(
        [np.where(x <= 100 * 1.02, 10 * x**-0.2, np.inf), 30 * x**-0.5, np.where(x >= 10 / 1.02, 500 * x**-0.1, np.inf)]
    )
    assert env["y"].to_numpy() == pytest.approx(closed.min(axis=0), rel=1e-9)
    assert env["run"].tolist() == [["a", "b", "w"][i] for i in closed.argmin(axis=0)]
    crossing = 1e10 * 3 ** (1 / 0.3)
    assert set(env.loc[env["compute"] < crossing, "run"]) == {"a"} and set(
        env.loc[env["compute"] > crossing, "run"]
    ) == {"b"}


def test_isoflop_optimum_is_the_vertex_of_the_log_parabola():
    sizes = np.array([1e6, 3e6, 1e7, 3e7])
    vertex = 5e6
    rows = [  # runs trained to 1e13, with an earlier eval at 1e12
        {"run": str(n), "params": n, "compute": c, "y": math.exp(0.2 * (math.log(n) - math.log(vertex)) ** 2 + 1.0)}
        for n in sizes
        for c in (1e12, 1e13)
    ]
    # A longer run of the largest size passes 1e13 mid-run far lower than any run trained to 1e13; a
    # mid-run eval is not a run of that budget (its schedule is another's), so the profile ignores it.
    rows += [{"run": "long", "params": 3e7, "compute": c, "y": 0.1} for c in (1e12, 1e14)]
    optima = isoflop_optima(pd.DataFrame(rows), np.array([1e13]))
    assert optima["interior"].iloc[0] and optima["n_opt"].iloc[0] == pytest.approx(vertex, rel=1e-9)
    assert optima["n_best"].iloc[0] == 3e6
    # Read at 1e14 only the long run is trained to that budget: one size, an edge.
    assert isoflop_optima(pd.DataFrame(rows), np.array([1e14]))["n_sizes"].tolist() == [1]
