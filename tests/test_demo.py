"""The demo (cmscale.demo): `cmscale demo --quick` end to end, through the real CLI, executor, store and report;
the example queries it prints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from cmscale.demo import spec_path
from cmscale.sweep.spec import load_spec

CMSCALE = [sys.executable, "-m", "cmscale.cli"]


# End to end: minutes of training on a busy machine, so every test of it is marked slow.
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("demo")
    env = os.environ | {"CMSCALE_CACHE_DIR": str(root / "cache")}
    completed = subprocess.run([*CMSCALE, "demo", "--quick", "--out", str(root / "results")],
                               capture_output=True, text=True, env=env, timeout=1500)
    return root / "results", completed


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_writes_the_report(quick_demo):
    root, completed = quick_demo
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    sweep = load_spec(spec_path(quick=True)).name
    report = root / "report" / sweep / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    html = report.read_text()
    for must in ("FID vs", "frontier", "SELECT"):
        assert must in html, f"{must!r} missing from {report}"
    assert f"report: {report}" in completed.stdout  # printed whole, for the user to open


@pytest.mark.slow
def test_quick_demo_lands_evals_of_every_run_in_duckdb(quick_demo):
    root, completed = quick_demo
    assert completed.returncode == 0
    with duckdb.connect(str(root / "cmscale.duckdb"), read_only=True) as connection:
        evals = connection.execute("SELECT count(*) FROM evals").fetchone()[0]
        runs, done = connection.execute("SELECT count(*), count(*) FILTER (WHERE status = 'done') FROM runs").fetchone()
        without_eval = connection.execute(
            "SELECT count(*) FROM runs r WHERE NOT EXISTS (SELECT 1 FROM evals e WHERE e.run_id = r.run_id)"
        ).fetchone()[0]
    assert evals > 0
    assert runs == done == 14  # 2 teachers + 2 sizes x 3 budgets x (ECT, sCD)
    assert without_eval == 0


@pytest.mark.slow
def test_quick_demo_records_kid_and_the_sample_count_and_prints_the_noise_floor(quick_demo):
    root, completed = quick_demo
    assert completed.returncode == 0
    spec = load_spec(spec_path(quick=True))
    with duckdb.connect(str(root / "cmscale.duckdb"), read_only=True) as connection:
        counts = connection.execute("SELECT DISTINCT num_samples FROM evals").fetchall()
        missing_kid = connection.execute(
            "SELECT count(*) FROM evals WHERE kid IS NULL OR kid_std IS NULL").fetchone()[0]
    assert counts == [(spec.defaults["eval"]["num_samples"],)] and missing_kid == 0
    floor = json.loads((root / "report" / spec.name / "noise_floor.json").read_text())
    assert floor["num_samples"] == spec.defaults["eval"]["num_samples"] and 0 < floor["fid_mean"] < 20
    assert "eval noise floor:" in completed.stdout


@pytest.mark.slow
def test_quick_demo_teachers_improve_with_size_and_students_with_compute(quick_demo):
    root, completed = quick_demo
    assert completed.returncode == 0
    with duckdb.connect(str(root / "cmscale.duckdb"), read_only=True) as connection:
        teachers = connection.execute(
            "SELECT r.params, r.final_step, e.fid FROM latest_eval e JOIN runs r USING (run_id) "
            "WHERE r.method = 'edm' ORDER BY r.params").fetchall()
        students = connection.execute(
            "SELECT r.method, r.preset, e.sampler_steps, regr_slope(ln(e.fid), ln(e.train_flops)) AS slope, count(*) "
            "FROM evals e JOIN runs r USING (run_id) WHERE r.method <> 'edm' "
            "GROUP BY ALL ORDER BY ALL").fetchall()
    # Teachers all train for the same number of iterations; the larger one is the better one.
    assert len({steps for _, steps, _ in teachers}) == 1
    assert teachers[0][2] > teachers[-1][2], teachers
    # Every size of every method: FID falls with training compute (log-log slope over its
    # 3 budgets x 3 eval fractions) at 1 and 2 sampling steps.
    assert len(students) == 8 and all(count == 9 and slope < 0 for *_, slope, count in students), students


@pytest.mark.slow
def test_quick_demo_fits_alpha_with_a_finite_ci_for_a_method(quick_demo):
    root, completed = quick_demo
    assert completed.returncode == 0
    sweep = load_spec(spec_path(quick=True)).name
    fitted = subprocess.run(
        [*CMSCALE, "fit", "powerlaw", "--sweep", sweep, "--root", str(root), "--json", "--n-draws", "200"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    fits = json.loads(fitted.stdout)
    finite = [
        fit
        for fit in fits
        if fit["method"] in ("ect", "scd")
        and all(math.isfinite(bound) for bound in fit["ci"]["alpha"])
        and fit["ci"]["alpha"][0] < fit["ci"]["alpha"][1]
    ]
    assert finite, json.dumps(fits, indent=1)[:3000]


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
