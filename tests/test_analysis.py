"""Frontier, extrapolation check, teacher-student ratio and the fit CLI, against known truths."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cmscale.analysis.data import parse_metric, sql_literal
from cmscale.analysis.extrapolation import holdout_validation
from cmscale.analysis.fit import evaluate_law
from cmscale.analysis.frontier import (
    compute_grid,
    envelope,
    frontier_law,
    isoflop_optima,
)
from cmscale.analysis.optimal import compute_optimal
from cmscale.analysis.ratio import ratio_regression, ratio_table
from cmscale.analysis.synthetic import JOINT_TRUTH, joint_data
from cmscale.cli import main

ALPHA, BETA = 0.3, 0.4
A_TRUE = BETA / (ALPHA + BETA)


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


def true_n_opt(compute):
    """argmin_N of A N^-alpha + B (C/6N)^-beta: N^(alpha+beta) = alpha A / (beta B) (C/6)^beta."""
    t = JOINT_TRUTH
    return (t["alpha"] * t["A"] / (t["beta"] * t["B"]) * (compute / 6) ** t["beta"]) ** (1 / (t["alpha"] + t["beta"]))


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


def test_fit_frontier_cli_recovers_the_compute_optimal_exponent(tmp_path):
    sizes, budgets = np.logspace(5, 10, 21), np.logspace(15, 21, 7)
    path = tmp_path / "isoflop.csv"
    isoflop_table(sizes, budgets).to_csv(path, index=False)
    result = CliRunner().invoke(
        main,
        [
            "fit",
            "frontier",
            "--csv",
            str(path),
            "--size-col",
            "N",
            "--compute-col",
            "C",
            "--y-col",
            "fid",
            "--run-col",
            "run",
            "--n-draws",
            "200",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    optima = pd.DataFrame(out["isoflop"]["optima"])
    assert len(optima) == 7 and optima["interior"].sum() >= 6
    inner = optima[optima["interior"]]
    # each interior optimum within half a size step of the truth
    assert np.all(np.abs(np.log(inner["n_opt"] / true_n_opt(inner["compute"]))) < 0.5 * math.log(sizes[1] / sizes[0]))
    fit = out["isoflop"]["n_opt_fit"]
    assert fit["n_budgets"] == len(inner) and abs(fit["a"] / A_TRUE - 1) < 0.05
    assert fit["ci"]["a"][0] <= A_TRUE <= fit["ci"]["a"][1]
    assert fit["bootstrap"]["n_groups"] == len(sizes) * len(budgets)  # runs, not budgets or rows
    assert out["envelope"]["n_opt_fit"]["a"] is not None  # the envelope's answer, side by side


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


def _ratio_data(slope: float, seed: int, sizes=np.logspace(7, 9, 5), seeds: int = 2, noise: float = 0.02):
    rng = np.random.default_rng(seed)
    params = np.repeat(sizes, seeds)
    teacher = 5.0 * (params / 1e7) ** -0.1 * np.exp(rng.normal(0, noise, params.size))
    ratio = 1.09 * (params / 1e7) ** slope * np.exp(rng.normal(0, noise, params.size))
    return params, teacher, teacher * ratio


def test_constant_ratio_gives_slope_ci_holding_zero():
    results = [ratio_regression(*_ratio_data(0.0, seed)) for seed in range(40)]
    first = results[0]
    assert first["slope_ci"][0] < 0 < first["slope_ci"][1]
    assert first["ci"][0] < 1.09 < first["ci"][1]
    holds_zero = np.mean([r["slope_ci"][0] < 0 < r["slope_ci"][1] for r in results])
    assert 0.85 <= holds_zero  # nominal 95%
    assert first["gap"] == pytest.approx(np.mean(_ratio_data(0.0, 0)[2] - _ratio_data(0.0, 0)[1]))


def test_ratio_growing_with_size_rejects_zero_slope():
    results = [ratio_regression(*_ratio_data(0.2, seed)) for seed in range(40)]
    assert all(r["slope_p"] < 0.05 and r["slope_ci"][0] > 0 for r in results)
    slopes = np.array([r["slope"] for r in results])
    assert abs(slopes.mean() - 0.2) < 0.01
    assert "with_teacher_fid" in results[0]


def test_ratio_table_groups_pairs():
    params, teacher, student = _ratio_data(0.0, 1)
    pairs = pd.concat(
        [
            pd.DataFrame({"group": "scd 2-step", "params": params, "teacher_fid": teacher, "student_fid": student}),
            pd.DataFrame(
                {"group": "scd 1-step", "params": params, "teacher_fid": teacher, "student_fid": 1.3 * student}
            ),
        ]
    )
    table = ratio_table(pairs)
    assert table["scd 1-step"]["mean_ratio"] == pytest.approx(1.3 * table["scd 2-step"]["mean_ratio"])
    assert table["scd 1-step"]["slope"] == pytest.approx(table["scd 2-step"]["slope"])


SCM_TABLE5 = {  # sCM (Lu & Song 2024) Table 5, ImageNet 512, FID; EDM2 sizes S..XXL in parameters
    "params": [280e6, 498e6, 778e6, 1119e6, 1523e6],
    "teacher": [2.29, 2.00, 1.87, 1.80, 1.73],
    "scd 2-step": [2.50, 2.26, 2.04, 1.93, 1.88],
    "scd 1-step": [3.07, 2.75, 2.55, 2.40, 2.28],
}


def test_fit_ratio_cli_on_published_scm_table(tmp_path):
    rows = [
        {"size": p, "teacher_fid": t, "student_fid": s, "group": group}
        for group in ("scd 2-step", "scd 1-step")
        for p, t, s in zip(SCM_TABLE5["params"], SCM_TABLE5["teacher"], SCM_TABLE5[group])
    ]
    path = tmp_path / "scm_table5.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    result = CliRunner().invoke(
        main,
        [
            "fit",
            "ratio",
            "--csv",
            str(path),
            "--size-col",
            "size",
            "--teacher-col",
            "teacher_fid",
            "--student-col",
            "student_fid",
            "--group-col",
            "group",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    two = out["scd 2-step"]
    assert set(two) >= {"mean_ratio", "ci", "slope", "slope_ci", "slope_p", "n_points"}
    expected = np.mean(np.array(SCM_TABLE5["scd 2-step"]) / np.array(SCM_TABLE5["teacher"]))
    assert two["mean_ratio"] == pytest.approx(expected) and 1.08 < two["mean_ratio"] < 1.11  # "within 10%"
    assert two["n_points"] == 5 and two["slope_ci"][0] < 0 < two["slope_ci"][1] and two["slope_p"] > 0.05
    assert (
        out["scd 1-step"]["mean_ratio"] > 1.3
        and out["scd 1-step"]["slope_ci"][0] < 0 < out["scd 1-step"]["slope_ci"][1]
    )


def _joint_csv(tmp_path):
    data = joint_data(n_sizes=5, n_budgets=4, evals_per_run=3, noise=0.02, seed=5)
    table = pd.DataFrame({"params": data.X[0], "images": data.X[1], "fid": data.y, "run": data.groups})
    table["flops"] = 6 * table["params"] * table["images"]
    path = tmp_path / "runs.csv"
    table.to_csv(path, index=False)
    return path, table


def test_fit_joint_cli_with_compute_column_and_held_out_top_budget(tmp_path):
    path, table = _joint_csv(tmp_path)
    base = [
        "fit",
        "joint",
        "--csv",
        str(path),
        "--n-col",
        "params",
        "--y-col",
        "fid",
        "--group-col",
        "run",
        "--n-draws",
        "50",
        "--json",
    ]
    by_c = CliRunner().invoke(main, base + ["--c-col", "flops"])
    by_d = CliRunner().invoke(main, base + ["--d-col", "images"])
    assert by_c.exit_code == 0 and by_d.exit_code == 0, by_c.output + by_d.output
    fit_c, fit_d = json.loads(by_c.output), json.loads(by_d.output)
    for key in ("E", "A", "B", "alpha", "beta"):
        assert fit_c[key] == pytest.approx(fit_d[key], rel=1e-6)  # D = C / (6N) is the same table
        assert fit_c["ci"][key][0] <= fit_c[key] <= fit_c["ci"][key][1]
    assert fit_c["status"] == "converged" and fit_c["n_points"] == len(table)
    assert abs(fit_c["alpha"] - 0.3) < 0.05 and abs(fit_c["beta"] - 0.4) < 0.05

    held = CliRunner().invoke(
        main, base + ["--c-col", "flops", "--drop-top", "3", "--loss", "huber", "--delta", "1e-3"]
    )
    assert held.exit_code == 0, held.output
    out = json.loads(held.output)
    assert out["loss"] == "huber" and out["n_points"] == len(table) - 3
    assert out["holdout"]["n_held_out"] == 3 and out["holdout"]["mean_abs_log_error"] < 0.1
    assert {"pred", "log_error", "inside_ci", "inside_pi"} <= set(out["holdout"]["points"][0])


def test_fit_cli_names_the_file_and_column_on_bad_input(tmp_path):
    path, _ = _joint_csv(tmp_path)
    result = CliRunner().invoke(
        main, ["fit", "joint", "--csv", str(path), "--n-col", "size", "--d-col", "images", "--y-col", "fid"]
    )
    assert (
        result.exit_code != 0
        and str(path) in result.output
        and "'size'" in result.output
        and "--n-col" in result.output
    )
    result = CliRunner().invoke(main, ["fit", "joint", "--csv", str(path), "--n-col", "params", "--y-col", "fid"])
    assert result.exit_code != 0 and "exactly one of --d-col or --c-col" in result.output


def test_powerlaw_cli_on_a_table(tmp_path):
    x = np.logspace(10, 14, 30)
    y = evaluate_law("saturating", {"E": 2.0, "A": 2e5, "alpha": 0.5}, x) * np.exp(
        np.random.default_rng(0).normal(0, 0.02, 30)
    )
    path = tmp_path / "curve.csv"
    pd.DataFrame({"flops": x, "fid": y}).to_csv(path, index=False)
    result = CliRunner().invoke(
        main, ["fit", "powerlaw", "--csv", str(path), "--x-col", "flops", "--y-col", "fid", "--n-draws", "50", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out) >= {"E", "A", "alpha", "ci", "status", "n_points"} and abs(out["alpha"] - 0.5) < 0.1


def test_metric_names_and_sql_quoting():
    assert parse_metric("fid_2step").sampler_steps == 2
    with pytest.raises(ValueError, match="fid_<k>step"):
        parse_metric("fid2")
    assert sql_literal("it's") == "'it''s'"


def test_demo_sql_prints_unwrapped_on_a_narrow_terminal():
    from rich.console import Console

    from cmscale.demo import EXAMPLE_QUERIES, print_sql

    console = Console(width=40, record=True, color_system=None)
    for _, sql in EXAMPLE_QUERIES:
        print_sql(console, sql.format(sweep="demo_digits"))
    printed = console.export_text().splitlines()
    expected = [line for _, sql in EXAMPLE_QUERIES for line in sql.format(sweep="demo_digits").splitlines()]
    assert [line.rstrip() for line in printed] == [line.rstrip() for line in expected]
    assert any(len(line) > 40 for line in expected)  # the check bites: some lines are wider than the terminal
