"""Law selection (cmscale.analysis.selection): a degenerate joint fit keeps the nested law and derives
nothing, an identified one keeps its derived exponent, and a CI needs three runs."""

from __future__ import annotations

import numpy as np
from law_tables import _no_floor_no_size_data

from cmscale.analysis.fit import fit_joint
from cmscale.analysis.selection import ci_problem, select_law
from cmscale.analysis.synthetic import joint_data


def test_degenerate_joint_fit_keeps_the_nested_law_and_derives_nothing():
    N, D, y, groups = _no_floor_no_size_data()
    full = fit_joint(N, D, y)
    assert {"E", "A"} <= set(full.at_bound) and full.status == "at_bound"
    assert full.to_json()["derived"] is None and "not identifiable" in full.to_json()["derived_reason"]
    choice = select_law("joint", [N, D], y, groups, n_draws=100, seed=0)
    assert choice.degenerate and choice.kept_law == "B D^-beta"
    assert choice.derived == {} and choice.to_json()["derived"] is None
    assert choice.derived_reason.startswith("not identifiable from these runs") and "N term" in choice.derived_reason


def test_identified_joint_law_is_kept_with_its_derived_exponent():
    data = joint_data(n_sizes=6, n_budgets=4, evals_per_run=3, noise=0.01, seed=2)
    choice = select_law("joint", data.X, data.y, data.groups, n_draws=100, seed=0)
    assert not choice.degenerate and choice.kept_law == "E + A N^-alpha + B D^-beta"
    a_true = 0.4 / 0.7
    assert abs(choice.derived["a"] - a_true) < 0.02 and choice.derived_ci["a"][0] <= a_true <= choice.derived_ci["a"][1]


def test_a_ci_needs_three_runs_and_wide_intervals_read_unbounded():
    x = np.logspace(10, 14, 8)
    y = 3e4 * x**-0.3 * np.exp(np.random.default_rng(0).normal(0, 0.02, 8))
    choice = select_law("saturating", [x], y, np.repeat([0, 1], 4), n_draws=100)
    assert choice.kept is not None and choice.ci == {} and "2 run(s): estimate without CI" in choice.ci_note
    assert ci_problem("A", 10.0, (0.5, 5e3)) == "the interval spans 4 decades (> 3)"
    assert ci_problem("A", 10.0, (0.0, 20.0)).startswith("the interval reaches 0")
    assert ci_problem("alpha", 0.3, (1e-4, 0.5)) == "the interval reaches the exponent's bound"
    assert ci_problem("slope", 0.16, (-0.33, 0.64)) == ""  # a signed drift: an interval across 0 is a finding
    assert ci_problem("E", 1.0, (0.0, 2.0)) == "" and ci_problem("A", 10.0, (5.0, 20.0)) == ""
