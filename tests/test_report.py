"""The sweep report on a stored synthetic sweep: real run directories, the real DuckDB store, the
real CLI, and a headless-Chromium screenshot checked for content."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from synthetic_sweep import (
    SIZES,
    SWEEP,
    build_sweep,
)

from cmscale.cli import main


def screenshot_variance(html: Path, out_png: Path, profile: Path) -> float:
    """Render ``html`` in headless Chromium and return the pixel variance of the screenshot."""
    from PIL import Image

    subprocess.run(
        [
            "/usr/bin/chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={out_png}",
            "--window-size=1200,1600",
            f"file://{html.resolve()}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(out_png).convert("L"), dtype=float)
    return float(pixels.var())


def summary_box_rows(png: Path) -> np.ndarray:
    """Rows of a screenshot crossed by the summary box's border (#0b5394) over most of the page width."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    border = np.abs(pixels - np.array([0x0B, 0x53, 0x94])).sum(axis=2) < 40
    return np.flatnonzero(border.sum(axis=1) > 0.5 * pixels.shape[1])


def test_report_on_stored_synthetic_sweep(tmp_path):
    from cmscale.results import ingest, query

    root = tmp_path / "results"
    build_sweep(root)
    report = ingest(root)
    assert (
        query(f"SELECT count(*) AS n FROM runs WHERE sweep = '{SWEEP}'", root=root, ingest_first=False)["n"][0]
        == 4 + 4 * 2 * 3 + 1
    ), report

    out = tmp_path / "report"
    result = CliRunner().invoke(
        main, ["report", SWEEP, "--out", str(out), "--root", str(root), "--n-draws", "30", "--no-ingest"]
    )
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    # self-contained: every figure is embedded, no file or network references
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) >= 6
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "src='http" not in html and "src='figures" not in html
    # the exact SQL behind the figures, the failed run, fit tables with CIs and the ratio table
    assert "FROM evals e JOIN runs r USING (sweep, run_id)" in html and "```sql" in md
    assert "ect-m-6e13-s0" in html and "is failed: loss is NaN at step 12" in html
    assert "compute-optimal size per budget" in md and "extrapolation" in md
    # findings first: the summary precedes the warnings, which are grouped with counts and collapsed
    assert html.index("id='summary'") < html.index("<h2>Warnings") < html.index("<h2>Figures")
    assert re.search(r"<details class='warn'><summary>[^<]+: \d+</summary>", html)
    # every summary number is in report.json
    summary = json.loads((out / "report.json").read_text())
    by_title = {m["title"]: m for m in summary["methods"]}
    ect2 = by_title["ect, 2-step"]
    assert set(ect2["per_size"]) == set(SIZES) and ect2["n_runs"] == 12
    for fit in ect2["per_size"].values():  # FID falls with compute at every size: alpha CI above 0
        assert (
            fit["params"]["alpha"] > 0
            and fit["ci"]["alpha"][0] > 0
            and fit["kept_law"] in ("E + A C^-alpha", "A C^-alpha")
        )
    optimal = ect2["compute_optimal"]
    assert optimal["n_runs"] == 12 and optimal["isoflop"]["n_opt_fit"]["bootstrap"]["n_groups"] == 12
    assert all("interior" in row for row in optimal["isoflop"]["optima"])
    n_opt = optimal["isoflop"]["n_opt_fit"]
    assert (n_opt["a"] is None) == (n_opt["reason"] is not None)  # an exponent, or the reason why not
    joint = ect2["n_opt_joint"]  # the joint law's exponent: synthetic FLOPs per image are 6 N per step
    assert (joint["a"] is None) == (joint["reason"] is not None)
    assert abs(joint["flops_per_image_exponent"] - 1.0) < 1e-6
    assert "| N_opt ∝ C^a: iso-FLOP; envelope; joint law |" in md  # all three approaches in the summary
    assert ect2["ratio"]["group"] == "ect 2-step" and len(ect2["ratio"]["slope_ci"]) == 2
    assert ect2["frontier"]["n_groups"] == 12 and ect2["finding"].endswith(".")
    # one teacher per size: a size ladder (FID by size), with no compute-optimal size fitted to it
    teacher = by_title["teacher (edm, Heun)"]
    assert teacher["compute_optimal"] is None and teacher["per_size"] == {}
    ladder = teacher["ladder"]
    assert [row["preset"] for row in ladder["sizes"]] == list(SIZES) and ladder["falls_with_size"] is True
    assert teacher["finding"].startswith("Teacher FID at ") and "falls with size: xxs" in teacher["finding"]
    assert not any(w["text"].startswith("teacher") for w in summary["warnings"]), summary["warnings"]
    # the extrapolation table tells a run's evals apart by step and compute
    assert "| step | train FLOPs |" in md
    assert "Teacher-student FID ratio" in md and "scd 2-step" in md
    for stem in ("ect_fid_2step_compute", "scd_fid_1step_nopt", "teacher_student", "sampling", "teacher_compute"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 5000
        assert (out / "figures" / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"

    # the same pairs from the CLI, one group per student method and step count
    result = CliRunner().invoke(main, ["fit", "ratio", "--sweep", SWEEP, "--root", str(root), "--json"])
    assert result.exit_code == 0, result.output
    ratios = json.loads(result.output)
    assert set(ratios) == {"ect 1-step", "ect 2-step", "scd 1-step", "scd 2-step"}
    for group in ratios.values():
        assert group["n_points"] == 4 and group["ci"][0] < group["mean_ratio"] < group["ci"][1]
        assert group["slope_ci"][0] < group["slope"] < group["slope_ci"][1] and 0 <= group["slope_p"] <= 1
    # students are worse than teachers here (factor > 1, fewer images), and 1-step worse than 2-step
    assert 1 < ratios["scd 2-step"]["mean_ratio"] < ratios["scd 1-step"]["mean_ratio"]

    # per-size and frontier power laws from the store, as JSON with CIs
    result = CliRunner().invoke(
        main,
        [
            "fit",
            "powerlaw",
            "--sweep",
            SWEEP,
            "--root",
            str(root),
            "--method",
            "scd",
            "--metric",
            "fid_2step",
            "--n-draws",
            "20",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    fits = json.loads(result.output)
    assert [f["fit_of"] for f in fits] == ["size xxs", "size xs", "size s", "size m", "frontier"]
    assert all({"kept_law", "params", "ci", "status", "n_points"} <= set(f) for f in fits)  # the report's law choice
    alpha, ci = fits[0]["params"]["alpha"], fits[0]["ci"]["alpha"]
    assert fits[0]["n_points"] == 9 and ci[0] <= alpha <= ci[1]

    if shutil.which("chromium") is None and not os.path.exists("/usr/bin/chromium"):
        pytest.skip("chromium is not installed")
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body style='background:#fff'></body></html>")
    assert screenshot_variance(blank, tmp_path / "blank.png", tmp_path / "profile_blank") < 1.0
    variance = screenshot_variance(out / "report.html", tmp_path / "shot.png", tmp_path / "profile")
    assert variance > 200.0, variance
    # the summary box (top and bottom border) lies within the first 1,400 px of the page
    rows = summary_box_rows(tmp_path / "shot.png")
    assert len(rows) >= 2 and rows[0] < 200 and rows[-1] < 1400 and rows[-1] - rows[0] > 100, rows


def test_the_finding_claims_growth_of_the_compute_optimal_size_only_from_a_ci_of_a_above_0():
    """The one-sentence finding names every approach's exponent; growth is claimed only from a CI above 0,
    and an approach whose CI includes 0 is named as such."""
    from types import SimpleNamespace

    from cmscale.analysis.report import finding as _finding

    def finding(iso_ci, joint_ci=None, joint_a=None):
        fit = SimpleNamespace(a=0.31, ci={"a": iso_ci} if iso_ci else {}, ci_reason="")
        optimal = SimpleNamespace(isoflop=fit, envelope_fit=SimpleNamespace(a=None), optima=None)
        joint = SimpleNamespace(a=joint_a, ci=joint_ci, ci_reason="")
        return _finding(SimpleNamespace(size_fits={}, optimal=optimal, ladder=None, joint_n_opt=joint), None)

    assert finding((0.05, 0.6)) == (
        "the compute-optimal size grows with compute (CI of a excludes 0): iso-FLOP a = 0.31 [0.05, 0.6]."
    )
    spanning = finding((-0.21, 0.68))
    assert "every CI includes 0: no detectable growth" in spanning and "grows" not in spanning
    assert finding(None) == "N_opt ∝ C^0.31 by iso-FLOP (no CI: too few runs)."
    # the joint law's CI above 0 is a finding; the iso-FLOP CI that includes 0 is said beside it
    both = finding((-0.21, 0.68), joint_ci=(0.05, 0.66), joint_a=0.2)
    assert both.startswith("the compute-optimal size grows with compute (CI of a excludes 0): joint law a = 0.2")
    assert "the CI includes 0 for iso-FLOP a = 0.31 [-0.21, 0.68]" in both
    assert "disagree on the sign" in finding((0.05, 0.6), joint_ci=(-0.5, -0.1), joint_a=-0.3)


def _method_analysis(points: pd.DataFrame):
    from cmscale.analysis import data as D
    from cmscale.analysis.pipeline import MethodAnalysis

    return MethodAnalysis("ect", D.parse_metric("fid_2step"), "-- synthetic", points)


def _length_dependent_sweep(flops_exponent: float = 1.0) -> pd.DataFrame:
    """Runs on the joint law's grid whose final evals follow the law, while their half-way evals
    score twice as badly (a schedule that depends on the run's length, like ECT's stages)."""
    from cmscale.analysis.fit import evaluate_law
    from cmscale.analysis.synthetic import JOINT_TRUTH

    rng = np.random.default_rng(11)
    rows = []
    for n in np.logspace(6, 8, 5):
        flops_per_image = 6.0 * n**flops_exponent
        for budget in np.logspace(16, 18, 4) * 1e6 ** (flops_exponent - 1):  # iso-FLOP budgets
            run = f"n{n:.0e}-c{budget:.0e}"
            for fraction, penalty in ((0.5, 2.0), (1.0, 1.0)):
                d = budget / flops_per_image * fraction
                fid = penalty * evaluate_law("joint", JOINT_TRUTH, n, d) * math.exp(rng.normal(0, 0.02))
                rows.append({"run_id": run, "preset": f"{n:.0e}", "params": n, "budget_flops": budget,
                             "step": int(fraction * 1000), "images_seen": d, "train_flops": d * flops_per_image,
                             "fid": fid})
    return pd.DataFrame(rows)


def test_the_joint_law_reads_runs_trained_to_their_budgets_and_recovers_n_opt_exponent():
    """N_opt ∝ C^a from the joint law, a = beta/(alpha+beta), fitted to each run's final eval:
    half-way evals of length-dependent schedules (twice as bad here) do not bias it."""
    from cmscale.analysis.pipeline import joint_law as _fit_joint
    from cmscale.analysis.synthetic import JOINT_TRUTH

    result = _method_analysis(_length_dependent_sweep())
    _fit_joint(result, n_draws=60, seed=0)
    a_true = JOINT_TRUTH["beta"] / (JOINT_TRUTH["alpha"] + JOINT_TRUTH["beta"])
    exponent = result.joint_n_opt
    assert result.joint.kept.n_points == 20  # one per run
    assert abs(exponent.a - a_true) < 0.05 * a_true and exponent.ci[0] <= a_true <= exponent.ci[1]
    assert abs(exponent.flops_per_image_exponent - 1.0) < 1e-9
    assert result.holdout is not None and len(result.holdout.points) == 5  # the held-out budget's runs


def test_the_joint_law_exponent_is_withheld_when_flops_per_image_do_not_grow_as_n():
    """a = beta/(alpha+beta) assumes training FLOPs ∝ N D; with FLOPs per image ∝ N^1.5 it is not printed."""
    from cmscale.analysis.pipeline import joint_law as _fit_joint
    from cmscale.analysis.report import joint_n_opt_text as _joint_n_opt_text

    result = _method_analysis(_length_dependent_sweep(flops_exponent=1.5))
    _fit_joint(result, n_draws=0, seed=0)
    assert result.joint.derived  # the law itself is fitted
    assert result.joint_n_opt.a is None and abs(result.joint_n_opt.flops_per_image_exponent - 1.5) < 1e-9
    assert "FLOPs per image grow as N^1.5" in _joint_n_opt_text(result.joint_n_opt)


def test_a_teacher_ladder_is_said_to_fall_with_size_only_when_every_larger_size_scores_lower():
    from cmscale.analysis.report import ladder_finding as _ladder_finding

    def ladder(fids):
        return pd.DataFrame({"preset": ["t6", "t8", "t12"], "params": [2.6e4, 4.5e4, 1.0e5],
                             "step": [1200] * 3, "train_flops": [1e11, 2e11, 4e11], "fid": fids})

    assert _ladder_finding(ladder([12.7, 9.0, 8.8])) == (
        "Teacher FID at 1,200 iterations falls with size: t6 12.7, t8 9, t12 8.8 (one teacher per size: no CI).")
    assert "does not fall at every larger size" in _ladder_finding(ladder([12.7, 8.8, 9.0]))


def test_the_joint_law_n_opt_curve_is_the_minimiser_of_the_law_at_fixed_compute():
    """N_opt(C) in closed form equals a brute-force minimum over N of A N^-alpha + B (C / (kappa N))^-beta,
    and its log-log slope is beta / (alpha + beta)."""
    from cmscale.analysis.pipeline import joint_n_opt_curve

    params, kappa = {"E": 1.8, "A": 400.0, "B": 2.0e4, "alpha": 0.3, "beta": 0.4}, 6.0
    compute = np.array([1e16, 1e18])
    n_opt = joint_n_opt_curve(params, kappa, compute)
    sizes = np.logspace(3, 12, 200_001)
    for c, closed_form in zip(compute, n_opt):
        loss = params["A"] * sizes ** -params["alpha"] + params["B"] * (c / (kappa * sizes)) ** -params["beta"]
        assert abs(math.log(sizes[np.argmin(loss)] / closed_form)) < 1e-3
    slope = math.log(n_opt[1] / n_opt[0]) / math.log(compute[1] / compute[0])
    assert abs(slope - 0.4 / 0.7) < 1e-12
