"""The report's figures and text, drawn from one analysis of a stored synthetic sweep: each figure's
data lies beside it as CSV (the evals and the fitted curves with their bands, the same numbers the
analysis holds), and the HTML and Markdown pages come from one context through the templates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from synthetic_sweep import SIZES, SWEEP, build_sweep


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    from cmscale.analysis.report import analyse_sweep
    from cmscale.results import ingest

    root = tmp_path_factory.mktemp("render") / "results"
    build_sweep(root)
    ingest(root)
    return analyse_sweep(root, SWEEP, n_draws=40, seed=0)


def test_each_figure_has_its_data_beside_it_as_csv(analysis, tmp_path):
    from cmscale.analysis.render import draw_figures

    records = draw_figures(analysis, tmp_path / "figures")
    assert {r.key for r in records} >= {"ect_fid_2step_compute", "ect_fid_2step_nopt", "teacher_student", "sampling"}
    for record in records:
        assert record.paths["csv"] == record.paths["png"].with_suffix(".csv") and record.paths["pdf"].exists()
    [ect2] = [m for m in analysis.methods if m.title == "ect, 2-step"]
    data = pd.read_csv(tmp_path / "figures" / "ect_fid_2step_compute.csv")
    assert set(data["layer"]) == {"eval", "size law", "envelope", "frontier law"}
    evals = data[data["layer"] == "eval"]
    assert len(evals) == len(ect2.points) and set(evals["series"]) == set(SIZES)
    np.testing.assert_array_equal(np.sort(evals["y"]), np.sort(ect2.points["fid"]))
    # a per-size curve is the kept law on its grid, with the bootstrap band around it
    law = data[(data["layer"] == "size law") & (data["series"] == "s")]
    np.testing.assert_allclose(law["y"], ect2.size_fits["s"].kept.predict(law["x"].to_numpy()), rtol=1e-12)
    assert (law["lo"] <= law["y"]).all() and (law["y"] <= law["hi"]).all()
    np.testing.assert_allclose(data.loc[data["layer"] == "envelope", "y"], ect2.envelope["y"], rtol=1e-12)
    nopt = pd.read_csv(tmp_path / "figures" / "ect_fid_2step_nopt.csv")
    optima = nopt[nopt["layer"] == "iso-FLOP optimum"]
    np.testing.assert_allclose(optima["y"], ect2.optimal.optima["n_opt"], rtol=1e-12)
    ratio = pd.read_csv(tmp_path / "figures" / "teacher_student.csv")
    assert set(ratio["layer"]) == {"teacher", "student", "ratio"}
    students = ratio[ratio["layer"] == "student"].reset_index(drop=True)
    ratios = ratio[ratio["layer"] == "ratio"].reset_index(drop=True)
    teachers = ratio[ratio["layer"] == "teacher"].reset_index(drop=True)
    np.testing.assert_allclose(ratios["y"], students["y"] / teachers["y"], rtol=1e-12)


def test_html_and_markdown_say_the_same_from_one_context(analysis, tmp_path):
    from cmscale.analysis.render import SUMMARY_HEADER, write_pages

    paths = write_pages(analysis, tmp_path)
    html, md = paths["html"].read_text(), paths["md"].read_text()
    findings = json.loads(paths["json"].read_text())
    for method in findings["methods"]:
        assert method["finding"] in md
        assert method["finding"].replace("'", "&#39;") in html
    assert "| " + " | ".join(SUMMARY_HEADER) + " |" in md
    assert "<th>" + "</th><th>".join(SUMMARY_HEADER) + "</th>" in html
    for name in ("ect_fid_2step_compute", "teacher_student"):
        assert f"[data](figures/{name}.csv)" in md and f"href='figures/{name}.csv'" in html
    n_figures = len(list((tmp_path / "figures").glob("*.png")))
    assert html.count("<figure>") == md.count("\n![") == n_figures >= 6
    assert f"{SWEEP}" in html and md.startswith(f"# cmscale report: {SWEEP}\n")
    # warnings: grouped with counts in both
    count = len(findings["warnings"])
    assert f"## Warnings ({count})" in md and f"<h2>Warnings ({count})</h2>" in html


def test_plot_writes_every_figure_with_its_csv(analysis, tmp_path):
    from click.testing import CliRunner

    from cmscale.cli import main

    result = CliRunner().invoke(main, ["plot", "--sweep", SWEEP, "--root", str(analysis.root), "--out",
                                       str(tmp_path), "--n-draws", "0", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert {"ect_fid_2step_compute", "teacher_student", "sampling"} <= set(figures)
    for paths in figures.values():
        assert sorted(paths) == ["csv", "pdf", "png"]
        assert all((tmp_path / name).exists() for name in (paths["png"], paths["csv"]))
