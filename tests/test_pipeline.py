"""One analysis behind every command: on one store (real run directories, the real DuckDB file, the
real CLI), ``fit powerlaw --sweep``, ``fit frontier --sweep``, ``fit ratio --sweep`` and ``report``
give identical numbers wherever they answer the same question."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from synthetic_sweep import SIZES, SWEEP, build_sweep

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


# ----------------------------------------------------------------------------- which EMA, which guidance

# Post-hoc EMA evals (`cmscale eval RUN --ema-sigma-rel W`) at the final step of three ect runs, as
# factors of the run's own final FID: A's best is the width 0.05, B's 0.15, C's its own EMA.
POSTHOC = {"A": ("ect-s-1e12-s0", {0.05: 0.8, 0.15: 0.9}),
           "B": ("ect-m-4e12-s0", {0.05: 1.1, 0.15: 0.85}),
           "C": ("ect-xs-2e13-s0", {0.05: 1.2, 0.15: 1.3})}
GUIDED = "ect-xxs-1e12-s0"  # also sampled at guidance 2 (not its configured scale)
# Quick 20-sample evals (`cmscale eval RUN --num-samples 20`) beside the 500-sample ones at a final
# step, with wildly different FIDs, as factors of the 500-sample eval's: A's own EMA, C's post-hoc
# 0.05 (each the lowest FID of its run, so `--ema best` would take it) and a teacher's Heun eval.
FEW_SAMPLES = 20
FEW = {(POSTHOC["A"][0], "eval", None): 0.1, (POSTHOC["C"][0], "eval-ema", 0.05): 0.5,
       ("edm-s-6e13-s0", "eval", None): 10.0}


def _final_evals(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row["kind"] == "eval"]
    last = max(row["step"] for row in evals)
    return [row for row in evals if row["step"] == last]


@pytest.fixture(scope="module")
def ema_store(tmp_path_factory):
    """The pipeline's sweep, plus post-hoc EMA evals, a guided eval and 20-sample evals (:data:`FEW`)
    appended as the CLI writes them."""
    from cmscale.results import ingest
    from cmscale.rundir import MetricsWriter

    root = tmp_path_factory.mktemp("ema") / "results"
    build_sweep(root)
    finals = {}
    for run_id, factors in POSTHOC.values():
        run_dir = root / SWEEP / run_id
        own = _final_evals(run_dir)
        with MetricsWriter(run_dir / "metrics.jsonl") as writer:
            for width, factor in factors.items():
                for row in own:
                    writer.write(row | {"kind": "eval-ema", "ema_sigma_rel": width, "fid": row["fid"] * factor})
        finals[run_id] = {row["sampler_steps"]: row["fid"] for row in own}
    with MetricsWriter(root / SWEEP / GUIDED / "metrics.jsonl") as writer:
        for row in _final_evals(root / SWEEP / GUIDED):
            writer.write(row | {"guidance": 2.0, "guidance_kind": "classifier-free", "fid": row["fid"] / 4})
    for (run_id, kind, width), factor in FEW.items():
        with MetricsWriter(root / SWEEP / run_id / "metrics.jsonl") as writer:
            for row in _final_evals(root / SWEEP / run_id):
                factor_500 = POSTHOC_FACTOR_005.get(run_id, 1.0) if kind == "eval-ema" else 1.0
                writer.write(row | {"kind": kind, "ema_sigma_rel": width, "num_samples": FEW_SAMPLES,
                                    "fid": row["fid"] * factor_500 * factor})
    ingest(root)
    return root, finals


def test_the_default_reads_each_runs_own_ema_at_its_configured_guidance(ema_store, store, tmp_path):
    root, _ = ema_store
    common = ["--no-ingest", "--n-draws", "0"]
    plain = cli_json("report", SWEEP, "--out", str(tmp_path / "plain"), "--root", str(store), *common)
    report = cli_json("report", SWEEP, "--out", str(tmp_path / "ema"), "--root", str(root), *common)
    # The post-hoc and guided evals change no number: the same fits as without them.
    assert report["methods"] == plain["methods"] and report["ratio"] == plain["ratio"]
    assert "ema" not in plain and "guidance" not in plain  # nothing to choose: report.json as before
    assert report["ema"]["option"] == "trained"
    assert {(t["ema_sigma_rel"], t["posthoc"]) for t in report["ema"]["taken"]} == {(None, False)}
    assert report["guidance"]["left_out"] == [{"run_id": GUIDED, "guidance": 2.0, "configured": 1.0, "n_evals": 2}]
    assert f"run {GUIDED}: 2 evals at guidance 2 left out" in json.dumps(report["warnings"])
    text = (tmp_path / "ema" / "report.md").read_text()
    assert "EMA: each run's own EMA" in text and "Guidance: each run's evals at its configured guidance" in text


def test_a_few_sample_eval_beside_the_full_one_changes_no_fitted_number(ema_store, store):
    from cmscale.results import query

    root, _ = ema_store
    # The store keeps both evals of each point (num_samples is in the eval key) ...
    kept = query("SELECT run_id, num_samples, count(*) AS n FROM evals WHERE step = (SELECT max(x.step) FROM evals x "
                 "WHERE x.sweep = evals.sweep AND x.run_id = evals.run_id) GROUP BY ALL", root=root, ingest_first=False)
    counts = {(r["run_id"], r["num_samples"]): r["n"] for r in kept.to_dicts()}
    for run_id, *_ in FEW:
        assert counts[run_id, FEW_SAMPLES] == (2 if run_id.startswith("ect") else 1), run_id
        assert counts[run_id, 500] >= counts[run_id, FEW_SAMPLES]
    # ... and every analysis reads the 500-sample one: the fits and the ratio as without the 20-sample rows.
    draws = ["--n-draws", "0"]
    for command in (["fit", "powerlaw", "--metric", "fid_2step", *draws],
                    ["fit", "frontier", "--metric", "fid_2step", *draws], ["fit", "ratio", "--budget", "all"]):
        few, plain = (cli_json(*command, "--sweep", SWEEP, "--root", str(where)) for where in (root, store))
        assert few == plain, command


def test_ema_best_takes_each_runs_lowest_final_fid_in_the_report_and_the_fits(ema_store, tmp_path):
    root, own = ema_store
    common = ["--root", str(root), "--n-draws", "0"]
    report = cli_json("report", SWEEP, "--out", str(tmp_path / "best"), "--no-ingest", "--ema", "best", *common)
    taken = {(t["run_id"], t["sampler_steps"]): t for t in report["ema"]["taken"]}
    expected = {"A": (0.05, True, 0.8), "B": (0.15, True, 0.85), "C": (None, False, 1.0)}
    for key, (width, posthoc, factor) in expected.items():
        run_id = POSTHOC[key][0]
        for steps in (1, 2):
            t = taken[run_id, steps]
            assert (t["ema_sigma_rel"], t["posthoc"]) == (width, posthoc), (key, steps)
            assert t["fid"] == pytest.approx(own[run_id][steps] * factor, rel=1e-12)
    assert report["ema"]["option"] == "best"
    # A and B contribute their post-hoc final eval alone (2 of their 3 evals fewer), C its whole run.
    by_title = {m["title"]: m for m in report["methods"]}
    assert by_title["ect, 2-step"]["n_evals"] == len(SIZES) * 3 * 3 - 2 * 2
    text = (tmp_path / "best" / "report.md").read_text()
    assert "EMA taken per run" in text and "0.05 (post-hoc)" in text and "(--ema best)" in text
    # fit --sweep takes the same EMA per run and gives the report's numbers.
    laws = cli_json("fit", "powerlaw", "--sweep", SWEEP, "--metric", "fid_2step", "--ema", "best", *common)
    optima = cli_json("fit", "frontier", "--sweep", SWEEP, "--metric", "fid_2step", "--ema", "best", *common)
    ect = {item["fit_of"]: item for item in laws if item["method"] == "ect"}
    runs = ect["frontier"]["ema"]["runs"]
    assert runs[POSTHOC["A"][0]] == "0.05 (post-hoc)" and runs[POSTHOC["B"][0]] == "0.15 (post-hoc)"
    assert runs[POSTHOC["C"][0]] == "ema_rates (own)"
    for preset, law in by_title["ect, 2-step"]["per_size"].items():
        item = ect[f"size {preset}"]
        assert {k: v for k, v in item.items() if k not in ("method", "metric", "fit_of", "size_params", "notes",
                                                           "ema")} == law
    [optimum] = [item for item in optima if item["of"] == "ect fid_2step"]
    assert {k: v for k, v in optimum.items() if k not in ("of", "ema")} == by_title["ect, 2-step"]["compute_optimal"]
    # Taking the best EMA moved the fitted numbers of the sizes whose runs it changed.
    plain = cli_json("fit", "powerlaw", "--sweep", SWEEP, "--metric", "fid_2step", *common)
    plain_ect = {item["fit_of"]: item for item in plain if item["method"] == "ect"}
    assert "ema" not in plain_ect["size s"]
    assert plain_ect["size s"]["params"] != ect["size s"]["params"]
    assert plain_ect["size xxs"]["params"] == ect["size xxs"]["params"]  # its runs kept their own EMA


def test_a_fixed_ema_width_takes_it_where_it_was_evaluated_and_names_the_runs_without(ema_store, tmp_path):
    root, own = ema_store
    result = CliRunner().invoke(main, ["fit", "powerlaw", "--sweep", SWEEP, "--metric", "fid_1step", "--method",
                                       "ect", "--ema", "0.05", "--root", str(root), "--n-draws", "0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("EMA: each run's evals at ema_sigma_rel = 0.05")
    assert sorted(lines[1:4]) == sorted(f"  {POSTHOC[k][0]}: 0.05 (post-hoc)" for k in "ABC")
    report = cli_json("report", SWEEP, "--out", str(tmp_path / "w"), "--no-ingest", "--ema", "0.05",
                      "--root", str(root), "--n-draws", "0")
    assert {t["run_id"] for t in report["ema"]["taken"]} == {POSTHOC[k][0] for k in "ABC"}
    assert all(t["fid"] == pytest.approx(own[t["run_id"]][t["sampler_steps"]] * POSTHOC_FACTOR_005[t["run_id"]])
               for t in report["ema"]["taken"])
    missing = [w["text"] for w in report["warnings"] if w["kind"] == "no eval at this EMA width"]
    assert len(missing) == 4 * 3 * 2 + 4 - 3 and "cmscale ema reconstruct RUN --sigma-rel 0.05" in missing[0]
    bad = CliRunner().invoke(main, ["fit", "powerlaw", "--sweep", SWEEP, "--ema", "wide", "--root", str(root)])
    assert bad.exit_code == 2 and "--ema 'wide': give 'best', 'trained' or an EMA width" in bad.output


POSTHOC_FACTOR_005 = {run_id: factors[0.05] for run_id, factors in POSTHOC.values()}
