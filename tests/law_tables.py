"""Tables drawn from known laws (cmscale.analysis.synthetic's joint law): a Chinchilla iso-FLOP table, and
a table with no floor and no size term, whose joint fit is degenerate."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cmscale.analysis.fit import evaluate_law
from cmscale.analysis.synthetic import JOINT_TRUTH, joint_data


def isoflop_table(sizes, budgets, noise=0.005, seed=1) -> pd.DataFrame:
    """One run per (size, budget), trained to C = 6 N D on the joint law: a Chinchilla iso-FLOP table."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        [
            {
                "N": n,
                "C": c,
                "fid": evaluate_law("joint", JOINT_TRUTH, n, c / (6 * n)) * math.exp(rng.normal(0, noise)),
                "run": f"{n:.4g}@{c:.4g}",
            }
            for c in budgets
            for n in sizes
        ]
    )


def _no_floor_no_size_data(seed: int = 0):
    """y = B D^-beta - 0.3 on a grid of sizes: no N dependence drives A to 0, the negative offset drives E to 0."""
    data = joint_data(n_sizes=5, n_budgets=4, evals_per_run=3, noise=0.01, seed=seed)
    N, D = data.X
    y = (2.0e4 * D**-0.4 - 0.3) * np.exp(np.random.default_rng(seed).normal(0, 0.01, D.size))
    return N, D, y, data.groups
