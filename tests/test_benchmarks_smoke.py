"""Every benchmark still runs: each ``benchmarks/bench_*.py`` (found by name, so a new one is covered
without a change here) runs at its smallest setting (``--smoke``, seconds) in its own process, with
its results written to a temporary folder (``CMSCALE_BENCH_RESULTS``), never to benchmarks/results.

A benchmark that needs something this machine may lack (a checkout of NVlabs/edm2 or locuslab/ect)
prints ``<name>: skipped, <why>`` and exits 0 without it; that is reported as a skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((REPO / "benchmarks").glob("bench_*.py"))
TIMEOUT_S = 300  # each takes seconds; the bound only keeps a hung benchmark from hanging CI


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=[path.stem for path in BENCHMARKS])
def test_benchmark_runs_at_its_smallest_setting(script, tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "CMSCALE_BENCH_RESULTS": str(results), "CMSCALE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CMSCALE_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script.name} --smoke ran past {TIMEOUT_S} s; its smallest setting must take seconds")
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{script.name} --smoke exited {done.returncode}:\n{output[-4000:]}"
    skipped = re.search(rf"^{script.stem}: skipped, (.*)$", done.stdout, flags=re.M)
    if skipped:
        pytest.skip(f"{script.name}: {skipped.group(1)}")
    written = sorted(path.name for path in results.glob("*.json"))
    assert written, f"{script.name} --smoke wrote no results JSON under $CMSCALE_BENCH_RESULTS:\n{output[-2000:]}"


def test_every_benchmark_has_a_smoke_setting():
    missing = [path.name for path in BENCHMARKS if '"--smoke"' not in path.read_text()]
    assert missing == [], f"give these benchmarks a --smoke option (their smallest setting): {missing}"
