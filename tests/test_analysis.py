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
from cmscale.analysis.frontier import envelope, fit_optimal_size, optimal_sizes
from cmscale.analysis.ratio import ratio_regression, ratio_table
from cmscale.analysis.synthetic import JOINT_TRUTH, joint_data
from cmscale.cli import main

ALPHA, BETA = 0.3, 0.4
A_TRUE = BETA / (ALPHA + BETA)


def frontier_points(sizes, computes, seeds=3, noise=0.01, seed=0) -> pd.DataFrame:
    """Evals of runs trained with C = 6 N D on the joint law; the seeds of a size share a curve."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for s in range(seeds):
            for c in computes:
                y = evaluate_law("joint", JOINT_TRUTH, n, c / (6 * n)) * math.exp(rng.normal(0, noise))
                rows.append(
                    {"size": f"{n:.2g}", "params": n, "compute": c, "y": y, "curve": "one", "run": f"{n:.3g}-{s}"}
                )
    return pd.DataFrame(rows)


def true_n_opt(compute):
    """argmin_N of A N^-alpha + B (C/6N)^-beta: N^(alpha+beta) = alpha A / (beta B) (C/6)^beta."""
    t = JOINT_TRUTH
    return (t["alpha"] * t["A"] / (t["beta"] * t["B"]) * (compute / 6) ** t["beta"]) ** (1 / (t["alpha"] + t["beta"]))


def test_envelope_reads_each_size_by_log_log_interpolation():
    points = pd.DataFrame({
        "size": ["a", "a", "b", "b"], "params": [1.0, 1.0, 2.0, 2.0], "compute": [1e10, 1e12, 1e10, 1e12],
        "y": [10.0, 1.0, 20.0, 0.8], "curve": "c", "run": ["a", "a", "b", "b"],
    })
    env = envelope(points, np.array([1e10, 1e11, 1e12, 1e13]))
    # at 1e11 (halfway in log): a -> sqrt(10 * 1) = 3.162 beats b -> sqrt(20 * 0.8) = 4; at 1e12 b's 0.8 wins
    assert env["compute"].tolist() == [1e10, 1e11, 1e12]  # 1e13 is beyond every curve: no extrapolation
    assert env["y"].tolist() == pytest.approx([10.0, math.sqrt(10.0), 0.8])
    assert env["params"].tolist() == [1.0, 1.0, 2.0]


def test_optimal_size_is_the_vertex_of_the_log_parabola():
    sizes = np.array([1e6, 3e6, 1e7, 3e7])
    vertex = 5e6
    rows = [
        {
            "size": str(n),
            "params": n,
            "compute": c,
            "y": math.exp(0.2 * (math.log(n) - math.log(vertex)) ** 2 + 1.0),
            "curve": "c",
            "run": str(n),
        }
        for n in sizes
        for c in (1e12, 1e14)
    ]
    optima = optimal_sizes(pd.DataFrame(rows), np.array([1e13]))
    assert not optima["edge"].iloc[0]
    assert optima["n_opt"].iloc[0] == pytest.approx(vertex, rel=1e-9)
    assert optima["n_opt_grid"].iloc[0] == 3e6


def test_frontier_recovers_the_compute_optimal_exponent():
    sizes = np.logspace(6, 9, 10)  # a factor 2.15 between sizes
    points = frontier_points(sizes, np.logspace(14, 20, 25))
    budgets = np.logspace(15, 19, 9)
    optima, fit = fit_optimal_size(points, budgets, n_draws=200, seed=0)
    inner = optima[~optima["edge"]]
    assert len(inner) >= 4
    # each interior optimum is within half a grid step of the truth
    assert np.all(np.abs(np.log(inner["n_opt"] / true_n_opt(inner["compute"]))) < 0.5 * math.log(sizes[1] / sizes[0]))
    assert abs(fit.a - A_TRUE) < 0.03
    lo, hi = fit.ci["a"]
    assert lo <= A_TRUE <= hi and hi - lo < 0.15
    assert fit.n_draws_used == 200 and fit.ols["a"] == pytest.approx(fit.a)


def test_edge_optimum_is_flagged_and_excluded_from_the_fit():
    sizes = np.logspace(6, 9, 7)
    points = frontier_points(sizes, np.logspace(12, 20, 33), seeds=2)
    budgets = np.logspace(12, 19, 15)
    optima, fit = fit_optimal_size(points, budgets, n_draws=50, seed=0)
    small = optima[optima["compute"] < 1e13]
    # at tiny budgets the smallest size wins: the optimum may lie below the grid
    assert small["edge"].all() and (small["n_opt_grid"] == sizes[0]).all()
    assert small["reason"].str.contains("smallest").all()
    inner = optima[~optima["edge"]]
    assert fit.n_points == len(inner) < len(optima)
    slope = np.polyfit(np.log(inner["compute"]), np.log(inner["n_opt"]), 1)[0]
    assert fit.a == pytest.approx(slope, rel=1e-9)  # the fit used exactly the non-edge budgets


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
    pairs = pd.concat([
        pd.DataFrame({"group": "scd 2-step", "params": params, "teacher_fid": teacher, "student_fid": student}),
        pd.DataFrame({"group": "scd 1-step", "params": params, "teacher_fid": teacher, "student_fid": 1.3 * student}),
    ])
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
