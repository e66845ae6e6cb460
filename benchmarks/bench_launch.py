"""Plan and dry-run-submit a 10,000-run sweep: time to plan, time to build the submissions, and the
number of sbatch calls (one per job array; arrays are split at the cluster's MaxArraySize).

Two layouts of the same 10,000 student runs (2 presets x 2 methods x 25 budgets x 100 seeds):
- ``given-teachers``: teacher checkpoints are given, so every run is independent and the runs go
  as a few arrays of at most MaxArraySize tasks;
- ``trained-teachers``: the sweep also trains one EDM teacher per (preset, seed) (200 more runs);
  the students of each teacher go as one array with an ``afterok`` dependency on it.

Planning counts FLOPs per step once per shape; the first plan counts them (cold), later plans
read ``$CMSCALE_CACHE_DIR/flops_per_step.json`` (warm). The cold count uses a fresh cache folder.

    python benchmarks/bench_launch.py            # 10,000 runs
    python benchmarks/bench_launch.py --quick    # 1,000 runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
GOAL_S = 10.0


def spec_raw(seeds: int, train_teachers: bool, teachers: Path) -> dict:
    raw = {
        "name": "bench_launch",
        "dataset": "digits",
        "resolution": 16,
        "presets": ["xxs", "xs"],
        "seeds": list(range(seeds)),
        "budgets": {"start": 1e12, "stop": 1e15, "num": 25},
        "methods": {"ect": {}, "scd": {}},
        "executor": {"name": "slurm", "profile": "local"},
    }
    if train_teachers:
        raw["teacher"] = {"train": True, "budget_flops": 1e14}
    else:
        # Planning checks that each checkpoint exists; it reads nothing from it.
        teachers.mkdir(parents=True, exist_ok=True)
        for preset in ("xxs", "xs"):
            (teachers / f"{preset}.pt").touch()
        raw["teacher"] = {"checkpoints": {preset: str(teachers / f"{preset}.pt") for preset in ("xxs", "xs")}}
    return raw


def measure(layout: str, seeds: int, root: Path) -> dict:
    from cmscale.cluster.slurm import cluster_max_array_size
    from cmscale.sweep.launch import submit_runs
    from cmscale.sweep.plan import plan_sweep
    from cmscale.sweep.spec import parse_spec

    spec = parse_spec(spec_raw(seeds, layout == "trained-teachers", root.parent / "teachers"), f"<{layout}>")
    started = time.perf_counter()
    runs = plan_sweep(spec, root, source=f"<{layout}>")
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    report = submit_runs(runs, spec, root, "slurm", "local", dry_run=True)
    submit_s = time.perf_counter() - started
    tasks = [array["tasks"] for array in report.arrays]
    return {
        "layout": layout,
        "runs": len(runs),
        "plan_s": round(plan_s, 3),
        "dry_run_submit_s": round(submit_s, 3),
        "sbatch_calls": report.sbatch_calls,
        "arrays": len(report.arrays),
        "largest_array": max(tasks),
        "max_array_size": cluster_max_array_size(),
        "submitted": len(report.submitted),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 runs instead of 10,000")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    seeds = 1 if args.smoke else 10 if args.quick else 100
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cmscale-bench-launch-") as tmp:
        # A fresh FLOP-count cache, so the first plan pays for counting every shape once.
        os.environ["CMSCALE_CACHE_DIR"] = str(Path(tmp) / "cache")
        # The first plan counts all six shapes (edm, ect, scd x 2 presets); the others read them.
        for layout, cache in (("trained-teachers", "cold"), ("trained-teachers", "warm"), ("given-teachers", "warm")):
            row = measure(layout, seeds, Path(tmp) / "results")
            row["flops_cache"] = cache
            rows.append(row)

    table = Table(
        title=f"plan + dry-run submit, {rows[-1]['runs']:,} runs (goal: plan < {GOAL_S:.0f} s, one sbatch per array)"
    )
    for column in (
        "layout",
        "FLOPs cache",
        "runs",
        "plan s",
        "dry-run submit s",
        "sbatch calls",
        "largest array",
        "MaxArraySize",
    ):
        table.add_column(column, justify="left" if column in ("layout", "FLOPs cache") else "right")
    for row in rows:
        table.add_row(
            row["layout"],
            row["flops_cache"],
            f"{row['runs']:,}",
            f"{row['plan_s']:.2f}",
            f"{row['dry_run_submit_s']:.2f}",
            str(row["sbatch_calls"]),
            str(row["largest_array"]),
            str(row["max_array_size"] or "-"),
        )
    console.print(table)

    warm = [row for row in rows if row["flops_cache"] == "warm"]
    summary = {
        "runs": rows[-1]["runs"],
        "plan_s_cold": rows[0]["plan_s"],
        "plan_s_warm": max(row["plan_s"] for row in warm),
        "sbatch_calls_given_teachers": rows[-1]["sbatch_calls"],
        "sbatch_calls_trained_teachers": rows[0]["sbatch_calls"],
        "load_average_1min": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "goal_plan_s": GOAL_S,
        "meets_goal_warm": max(row["plan_s"] for row in warm) < GOAL_S,
        "meets_goal_cold": rows[0]["plan_s"] < GOAL_S,
    }
    results = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or HERE / "results")
    results.mkdir(parents=True, exist_ok=True)
    (results / "launch.json").write_text(
        json.dumps({"summary": summary, "rows": rows, "quick": args.quick}, indent=2) + "\n"
    )
    console.print(f"wrote {results / 'launch.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
