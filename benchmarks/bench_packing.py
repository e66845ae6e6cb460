"""Wall time of the quick demo's sweep (2 EDM teachers, then 12 students, local executor, 2 at once)
with one run per job and with packed runs (``runs_per_job``), in one session on this machine.

Packing changes only the sweep: each job pays its interpreter start and torch import once per pack
instead of once per run. Ingest, fits and the report (the rest of ``cmscale demo``) are untouched,
so this times planning and training the demo's sweep. The load average is recorded beside the
figures: on a shared machine only the ratio of the two is meaningful.

    python benchmarks/bench_packing.py                 # runs_per_job 1 and 6
    python benchmarks/bench_packing.py --packed 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent


# --smoke: two one-step EDM runs instead of the quick demo (the code path, in seconds)
SMOKE_SPEC = {"name": "bench_packing_smoke", "presets": ["xxs"], "seeds": [0, 1], "budgets_flops": [1e9],
              "methods": {"edm": {}}, "defaults": {"batch_size": 4, "eval": {"at_fractions": []}},
              "executor": {"name": "local", "max_parallel": 2}}


def time_sweep(runs_per_job: int, smoke: bool = False) -> dict:
    from cmscale.demo import spec_path
    from cmscale.sweep.launch import submit_runs
    from cmscale.sweep.plan import plan_sweep
    from cmscale.sweep.spec import load_spec, parse_spec

    spec = parse_spec(SMOKE_SPEC, "<smoke>") if smoke else load_spec(spec_path(quick=True))
    spec.executor.runs_per_job = runs_per_job
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as root:
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        runs = plan_sweep(spec, Path(root), source="demo_digits_quick.toml")
        report = submit_runs(runs, spec, Path(root), "local", None)
        wall_s = time.perf_counter() - started
        done = sum(1 for run in runs if (run.run_dir(Path(root)) / "done.json").is_file())
        return {"runs_per_job": runs_per_job, "runs": len(runs), "submitted": len(report.submitted), "done": done,
                "wall_s": round(wall_s, 1), "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", type=int, default=6, help="runs_per_job of the packed sweep")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.packed = 2
    rows = [time_sweep(1, args.smoke), time_sweep(args.packed, args.smoke)]
    table = Table(title=f"quick demo sweep, local executor, {os.cpu_count()} cores")
    for column in ("runs_per_job", "runs", "done", "wall_s", "load_before", "load_after"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{row[key]:.2f}" if isinstance(row[key], float) else str(row[key])
                        for key in ("runs_per_job", "runs", "done", "wall_s", "load_before", "load_after")))
    Console().print(table)
    ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
    print(f"packed / unpacked wall time: {ratio:.2f}")
    out = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or HERE / "results") / "packing.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "packed_over_unpacked": ratio, "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
