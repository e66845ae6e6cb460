"""`cmscale fit` (cmscale.cli.analysis): power laws, joint laws, frontiers and ratios fitted from a CSV table;
bad input names the file and the column; an option naming nothing in the sweep is refused with the choices,
never a silent empty answer."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from law_tables import _no_floor_no_size_data, isoflop_table
from synthetic_sweep import SWEEP, build_sweep

from cmscale.analysis.fit import evaluate_law
from cmscale.analysis.synthetic import JOINT_TRUTH, joint_data
from cmscale.cli.main import main
from cmscale.results import ingest


def test_fit_powerlaw_with_an_unknown_method_names_the_sweeps_methods(tmp_path):
    build_sweep(tmp_path)
    ingest(tmp_path)
    args = ["fit", "powerlaw", "--sweep", SWEEP, "--root", str(tmp_path), "--n-draws", "20"]
    result = CliRunner().invoke(main, [*args, "--method", "nosuch"])
    assert result.exit_code == 2, result.output
    assert "--method" in result.output and "nosuch" in result.output and "ect" in result.output
    assert CliRunner().invoke(main, [*args, "--method", "ect", "--json"]).exit_code == 0


ALPHA, BETA = 0.3, 0.4
A_TRUE = BETA / (ALPHA + BETA)


def true_n_opt(compute):
    """argmin_N of A N^-alpha + B (C/6N)^-beta: N^(alpha+beta) = alpha A / (beta B) (C/6)^beta."""
    t = JOINT_TRUTH
    return (t["alpha"] * t["A"] / (t["beta"] * t["B"]) * (compute / 6) ** t["beta"]) ** (1 / (t["alpha"] + t["beta"]))


SCM_TABLE5 = {  # sCM (Lu & Song 2024) Table 5, ImageNet 512, FID; EDM2 sizes S..XXL in parameters
    "params": [280e6, 498e6, 778e6, 1119e6, 1523e6],
    "teacher": [2.29, 2.00, 1.87, 1.80, 1.73],
    "scd 2-step": [2.50, 2.26, 2.04, 1.93, 1.88],
    "scd 1-step": [3.07, 2.75, 2.55, 2.40, 2.28],
}


def _joint_csv(tmp_path):
    data = joint_data(n_sizes=5, n_budgets=4, evals_per_run=3, noise=0.02, seed=5)
    table = pd.DataFrame({"params": data.X[0], "images": data.X[1], "fid": data.y, "run": data.groups})
    table["flops"] = 6 * table["params"] * table["images"]
    path = tmp_path / "runs.csv"
    table.to_csv(path, index=False)
    return path, table
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


def test_fit_joint_cli_prints_no_exponent_from_a_degenerate_fit(tmp_path):
    from click.testing import CliRunner

    from cmscale.cli import main

    N, D, y, groups = _no_floor_no_size_data()
    path = tmp_path / "degenerate.csv"
    pd.DataFrame({"N": N, "D": D, "y": y, "run": groups}).to_csv(path, index=False)
    result = CliRunner().invoke(
        main,
        [
            "fit",
            "joint",
            "--csv",
            str(path),
            "--n-col",
            "N",
            "--d-col",
            "D",
            "--y-col",
            "y",
            "--group-col",
            "run",
            "--n-draws",
            "20",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "not identifiable from these runs" in result.output and not re.search(r"\ba=", result.output)
