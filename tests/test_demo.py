"""The main job: `cmscale demo --quick` end to end, through the real CLI, executor, store and report."""

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

pytestmark = pytest.mark.slow  # end to end: minutes of training on a busy machine

CMSCALE = [sys.executable, "-m", "cmscale.cli"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("demo")
    env = os.environ | {"CMSCALE_CACHE_DIR": str(root / "cache")}
    completed = subprocess.run([*CMSCALE, "demo", "--quick", "--out", str(root / "results")],
                               capture_output=True, text=True, env=env, timeout=1500)
    return root / "results", completed


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
