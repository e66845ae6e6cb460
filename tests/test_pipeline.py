"""One analysis behind every command: on one store (real run directories, the real DuckDB file, the
real CLI), ``fit powerlaw --sweep``, ``fit frontier --sweep``, ``fit ratio --sweep`` and ``report``
give identical numbers wherever they answer the same question."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_report import SIZES, SWEEP, build_sweep

from cmscale.cli import main

DRAWS = "40"  # < 300: serial bootstrap, and enough draws for CIs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from cmscale.results import ingest

    root = tmp_path_factory.mktemp("pipeline") / "results"
    build_sweep(root)
    ingest(root)
    return root


def cli_json(*args: str):
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_fit_commands_and_the_report_give_the_same_numbers(store, tmp_path):
    common = ["--root", str(store), "--n-draws", DRAWS, "--seed", "3"]
    report = cli_json("report", SWEEP, "--out", str(tmp_path / "report"), "--no-ingest", *common)
    assert report == json.loads((tmp_path / "report" / "report.json").read_text())
    by_title = {m["title"]: m for m in report["methods"]}
    compared = 0
    for metric in ("fid_2step",):  # fid_1step goes the same way
        steps = metric[4]
        laws = cli_json("fit", "powerlaw", "--sweep", SWEEP, "--metric", metric, *common)
        optima = cli_json("fit", "frontier", "--sweep", SWEEP, "--metric", metric, *common)
        for method in ("ect", "scd"):
            found = by_title[f"{method}, {steps}-step"]
            items = {item["fit_of"]: item for item in laws if item["method"] == method}
            assert set(items) == {f"size {p}" for p in SIZES} | {"frontier"}
            for preset, law in found["per_size"].items():
                item = items[f"size {preset}"]
                shared = {k: v for k, v in item.items() if k not in ("method", "metric", "fit_of", "size_params",
                                                                      "notes")}
                assert shared == law, (method, metric, preset)
                assert item["size_params"] == SIZES[preset]
                compared += 1
            frontier = {k: v for k, v in items["frontier"].items() if k not in ("method", "metric", "fit_of", "notes")}
            assert frontier == found["frontier"]
            [optimum] = [item for item in optima if item["of"] == f"{method} {metric}"]
            assert {k: v for k, v in optimum.items() if k != "of"} == found["compute_optimal"]
            compared += 2
        # one teacher per size is a size ladder: no per-size laws or N_opt, here as in the report
        teacher = by_title["teacher (edm, Heun)"]
        assert teacher["per_size"] == {} and teacher["compute_optimal"] is None
        assert [item["fit_of"] for item in laws if item["method"] == "edm"] == ["size ladder"]
        assert [item["status"] for item in optima if item["of"].startswith("edm")] == ["not_fitted"]
    assert compared == 2 * (len(SIZES) + 2)
    # the per-size alpha CI is a real interval and the nested law is the report's choice
    ect2 = by_title["ect, 2-step"]["per_size"]["s"]
    assert ect2["ci"]["alpha"][0] < ect2["params"]["alpha"] < ect2["ci"]["alpha"][1]
    ratio = cli_json("fit", "ratio", "--sweep", SWEEP, "--root", str(store))
    assert ratio == report["ratio"]


def test_fit_powerlaw_prints_the_kept_law_per_size_and_why_a_ladder_is_not_fitted(store):
    result = CliRunner().invoke(
        main, ["fit", "powerlaw", "--sweep", SWEEP, "--root", str(store), "--n-draws", "0", "--method", "edm"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("edm size ladder: not fitted (one teacher per size")
    result = CliRunner().invoke(
        main, ["fit", "powerlaw", "--sweep", SWEEP, "--root", str(store), "--n-draws", "0", "--method", "ect"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("ect size xxs: ") and "alpha=" in lines[0] and "status=converged" in lines[0]
    assert any(line.startswith("ect frontier: ") for line in lines)


def test_a_sweep_not_in_the_store_is_named_with_the_fix(store):
    for command in (["fit", "powerlaw"], ["fit", "frontier"]):
        result = CliRunner().invoke(main, [*command, "--sweep", "nosuch", "--root", str(store)])
        assert result.exit_code == 1 and "sweep 'nosuch' has no runs in" in result.output, result.output
        result = CliRunner().invoke(main, [*command, "--sweep", SWEEP, "--method", "ect", "--metric", "fid_3step",
                                           "--root", str(store)])
        assert result.exit_code == 1 and "no finished run has fid_3step evals for method 'ect'" in result.output
    result = CliRunner().invoke(main, ["fit", "powerlaw", "--sweep", SWEEP, "--root", str(store / "empty")])
    assert result.exit_code == 1 and "no results store; run `cmscale results ingest" in result.output
