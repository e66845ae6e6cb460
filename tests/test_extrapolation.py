"""The extrapolation check (cmscale.analysis.extrapolation): held-out budgets and sizes of a known law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cmscale.analysis.extrapolation import holdout_validation
from cmscale.analysis.fit import evaluate_law
from cmscale.analysis.synthetic import JOINT_TRUTH, joint_data


def test_extrapolation_check_predicts_held_out_budget_of_a_known_law():
    data = joint_data(n_sizes=6, n_budgets=5, evals_per_run=4, noise=0.02, seed=3)
    budget = np.repeat(np.arange(30) % 5, 4)  # run r has budget index r % 5
    table = pd.DataFrame({"N": data.X[0], "D": data.X[1], "y": data.y, "run": data.groups, "budget": budget})
    result = holdout_validation(
        table, form="joint", x_cols=["N", "D"], y_col="y", by="budget", k=1, group_col="run", n_draws=100
    )
    held = result.points
    assert result.held_values == [4.0] and len(held) == 24 and result.fit.n_points == 96
    truth = evaluate_law("joint", JOINT_TRUTH, held["N"], held["D"])
    # the prediction is close to the true law beyond the fitted range, and the log error is the noise
    assert np.max(np.abs(np.log(held["pred"] / truth))) < 0.05
    assert result.rms_log_error < 0.04
    assert held["log_error"].to_numpy() == pytest.approx(np.log(held["pred"] / held["y"]).to_numpy())
    assert held["inside_pi"].mean() >= 0.8
    assert set(result.to_json()) >= {"mean_abs_log_error", "frac_inside_ci", "frac_inside_pi", "points"}


def test_extrapolation_check_can_hold_out_the_largest_size():
    data = joint_data(n_sizes=6, n_budgets=4, evals_per_run=3, noise=0.02, seed=4)
    table = pd.DataFrame({"N": data.X[0], "D": data.X[1], "y": data.y, "run": data.groups})
    result = holdout_validation(
        table, form="joint", x_cols=["N", "D"], y_col="y", by="N", k=1, group_col="run", n_draws=60
    )
    assert (result.points["N"] == table["N"].max()).all()
    assert result.mean_abs_log_error < 0.05
