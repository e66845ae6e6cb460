"""The fitting engine against synthetic laws with known parameters and against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from cmscale.analysis.fit import (
    bootstrap_fit,
    evaluate_law,
    fit_joint,
    fit_power_law,
    fit_with_bootstrap,
    group_weights,
    ols_loglog,
)
from cmscale.analysis.synthetic import coverage_study, joint_data, saturating_data

# tolerances per multiplicative noise level (about 4 standard errors of each estimate at that noise)
SATURATING_TOL = {0.01: {"E": 0.03, "alpha": 0.03}, 0.03: {"E": 0.08, "alpha": 0.08}, 0.1: {"E": 0.25, "alpha": 0.25}}
JOINT_TOL = {
    0.01: {"E": 0.1, "alpha": 0.01, "beta": 0.01},
    0.03: {"E": 0.3, "alpha": 0.03, "beta": 0.03},
    0.1: {"E": 0.8, "alpha": 0.08, "beta": 0.08},
}


@pytest.mark.parametrize("noise", [0.01, 0.03, 0.1])
def test_saturating_law_recovered_with_ci_covering_truth(noise):
    data = saturating_data(noise=noise, seed=1)
    fit = fit_with_bootstrap("saturating", data.X, data.y, data.groups, n_draws=100, seed=0)
    assert fit.status == "converged" and fit.at_bound == []
    for name, tol in SATURATING_TOL[noise].items():
        assert abs(fit.params[name] - data.truth[name]) < tol, (name, fit.params)
        lo, hi = fit.ci[name]
        assert lo <= data.truth[name] <= hi, (name, fit.ci[name])


def test_saturating_alpha_ci_coverage_over_seeded_replicates():
    # the full 200-replicate study (>= 88% required) is in benchmarks/bench_fit.py
    study = coverage_study("saturating", 10, noise=0.03, n_draws=100, n_runs=10)
    assert study["alpha"]["coverage"] >= 0.8, study
    assert abs(study["alpha"]["median_estimate"] - 0.5) < 0.03


@pytest.mark.parametrize("noise", [0.01, 0.03, 0.1])
def test_joint_law_recovered_with_ci_covering_truth(noise):
    data = joint_data(n_sizes=8, n_budgets=4, evals_per_run=4, noise=noise, seed=2)
    fit = fit_with_bootstrap("joint", data.X, data.y, data.groups, n_draws=60, seed=0)
    assert fit.status == "converged"
    for name, tol in JOINT_TOL[noise].items():
        assert abs(fit.params[name] - data.truth[name]) < tol, (name, fit.params)
        lo, hi = fit.ci[name]
        assert lo <= data.truth[name] <= hi, (name, fit.ci[name])
    # the compute-optimal exponent a = beta / (alpha + beta) gets its own CI
    lo, hi = fit.ci["a"]
    assert lo <= 0.4 / 0.7 <= hi


def test_joint_ci_coverage_over_seeded_replicates():
    study = coverage_study("joint", 6, noise=0.03, n_draws=60, n_sizes=6, n_budgets=4, evals_per_run=3)
    assert study["alpha"]["coverage"] >= 5 / 6 and study["beta"]["coverage"] >= 5 / 6, study


def test_fit_that_wants_negative_offset_reports_the_bound():
    x = np.logspace(10, 13, 30)
    truth = {"E": -0.5, "A": 2.0e4, "alpha": 0.3}  # y stays > 0 on this range but the offset is negative
    y = evaluate_law("saturating", truth, x) * np.exp(np.random.default_rng(3).normal(0, 0.01, x.size))
    assert np.all(y > 0)
    fit = fit_power_law(x, y, form="saturating")
    assert fit.status == "at_bound" and "E" in fit.at_bound and fit.params["E"] == pytest.approx(0.0, abs=1e-6)
    assert fit.to_json()["status"] == "at_bound"
    # the same data without the offset term fit cleanly
    assert fit_power_law(x, np.full_like(y, 1.0) + y, form="saturating").status == "converged"


def test_linear_loss_recovers_noiseless_law_exactly():
    x = np.logspace(9, 13, 25)
    truth = {"E": 1.5, "A": 300.0, "alpha": 0.25}
    fit = fit_power_law(x, evaluate_law("saturating", truth, x), loss="linear")
    assert fit.status == "converged"
    for name, value in truth.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-5)


def test_huber_loss_resists_outliers_that_pull_the_squared_log_loss():
    data = saturating_data(noise=0.01, seed=4)
    y = data.y.copy()
    y[[5, 25, 45]] *= 1.6  # three evals that went wrong
    squared = fit_power_law(data.X[0], y)
    huber = fit_power_law(data.X[0], y, loss="huber", delta=1e-2)
    assert abs(huber.params["alpha"] - 0.5) < 0.02
    assert abs(huber.params["alpha"] - 0.5) < 0.5 * abs(squared.params["alpha"] - 0.5)
    assert huber.to_json()["delta"] == 1e-2


def test_pure_power_law_fit_matches_closed_form_and_hc3_errors():
    rng = np.random.default_rng(5)
    x = np.logspace(0, 4, 40)
    y = 7.0 * x**-0.6 * np.exp(rng.normal(0, 0.05 * (1 + np.log10(x)), x.size))  # heteroskedastic
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    fit = fit_with_bootstrap("pure", [x], y, n_draws=50, seed=0)
    assert fit.params["alpha"] == pytest.approx(-slope, rel=1e-6)
    assert fit.params["A"] == pytest.approx(np.exp(intercept), rel=1e-6)
    # HC3 by hand: (X'X)^-1 X' diag(e^2 / (1 - h)^2) X (X'X)^-1
    X = np.column_stack([np.ones_like(x), np.log(x)])
    bread = np.linalg.inv(X.T @ X)
    resid = np.log(y) - X @ np.array([intercept, slope])
    leverage = np.einsum("ij,jk,ik->i", X, bread, X)
    meat = X.T @ (X * (resid**2 / (1 - leverage) ** 2)[:, None])
    assert fit.ols["se_alpha"] == pytest.approx(np.sqrt((bread @ meat @ bread)[1, 1]), rel=1e-8)
    assert fit.ols == ols_loglog(x, y)


def test_bootstrap_resamples_whole_runs_not_rows():
    groups = np.repeat(["a", "b", "c", "d"], [3, 1, 2, 4])
    weights, n_groups = group_weights(groups, groups.size, 200, np.random.default_rng(0))
    assert n_groups == 4 and weights.shape == (200, 10)
    for name in "abcd":
        block = weights[:, groups == name]
        assert np.all(block == block[:, :1])  # every row of a run carries the run's count
    per_run = np.stack([weights[:, groups == name][:, 0] for name in "abcd"], axis=1)
    assert np.all(per_run.sum(axis=1) == 4)  # each draw picks 4 runs


def test_bootstrap_is_seeded_and_parallel_draws_match_serial():
    data = saturating_data(n_runs=8, noise=0.03, seed=6)
    serial = fit_power_law(*data.X, data.y)
    parallel = fit_power_law(*data.X, data.y)
    a = bootstrap_fit(serial, data.groups, n_draws=40, seed=11, n_jobs=1)
    b = bootstrap_fit(parallel, data.groups, n_draws=40, seed=11, n_jobs=2)
    np.testing.assert_allclose(a.draws, b.draws, rtol=1e-10)


def test_joint_fit_rejects_bad_input_with_a_clear_message():
    with pytest.raises(ValueError, match="input N must be finite and > 0"):
        fit_joint(np.array([1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0]), np.ones(7), np.ones(7))
    with pytest.raises(ValueError, match="need at least 6 points"):
        fit_joint(np.arange(1.0, 5.0), np.arange(1.0, 5.0), np.ones(4))
