"""Benchmark the results store: first ingest of N metric rows over R runs, no-op re-ingest, and an
incremental ingest of appended rows. Goal: >= 200k rows/s for the first ingest of 1,000,000 rows
over 500 runs, and a no-op re-ingest under 10% of it.

    .venv/bin/python benchmarks/bench_store.py                 # 1,000,000 rows, 500 runs
    .venv/bin/python benchmarks/bench_store.py --rows 100000   # smaller

Writes benchmarks/results/store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cmscale.results import ingest, query
from cmscale.rundir import atomic_write_json

EVAL_EVERY = 200  # one eval row per sampler step count every EVAL_EVERY train steps


def _lines(rank: int, start: int, stop: int) -> str:
    # Formatted directly (the trainer's json.dumps output has the same shape) so that generating
    # a million rows does not dominate the benchmark's wall time.
    out = []
    for step in range(start, stop):
        out.append(
            f'{{"kind": "train", "step": {step}, "images_seen": {64 * step}, "train_flops": {1.2345e9 * step!r}, '
            f'"loss": {0.5 / (1 + step) + rank * 1e-6!r}, "wall_s": {0.013 * step!r}}}\n'
        )
        if step % EVAL_EVERY == EVAL_EVERY - 1:
            for sampler_steps in (1, 2):
                out.append(
                    f'{{"kind": "eval", "step": {step}, "train_flops": {1.2345e9 * step!r}, '
                    f'"images_seen": {64 * step}, '
                    f'"sampler_steps": {sampler_steps}, "nfe": {sampler_steps}, "fid": {100.0 / (1 + step)!r}, '
                    f'"num_samples": 1000, "extractor": "digits-classifier", "reference": "digits-train", '
                    f'"sampling_flops_per_image": {2e6 * sampler_steps!r}, "wall_s": 1.5}}\n'
                )
    return "".join(out)


def build(root: Path, rows: int, runs: int) -> tuple[int, int]:
    """Write ``runs`` run directories holding ``rows`` train rows in all; returns (train, eval) row counts."""
    per_run = rows // runs
    n_eval = 0
    for rank in range(runs):
        run_dir = root / "bench" / f"run{rank:04d}"
        run_dir.mkdir(parents=True)
        atomic_write_json(run_dir / "config.json", {"method": "ect", "preset": "s", "params": 10_000 + rank,
                                                    "budget_iters_resolved": per_run, "flops_per_step": 1.2345e9,
                                                    "seed": rank, "run_id": f"run{rank:04d}"})
        atomic_write_json(run_dir / "done.json", {"status": "done", "reason": None, "final_step": per_run - 1,
                                                  "started": 1.7e9, "finished": 1.7e9 + 60})
        text = _lines(rank, 0, per_run)
        n_eval += text.count('"kind": "eval"')
        (run_dir / "metrics.jsonl").write_text(text)
    return per_run * runs, n_eval


def append(root: Path, runs: int, per_run: int, extra: int) -> int:
    """Append ``extra`` train rows to each of the first ``runs`` runs (jobs still training)."""
    for rank in range(runs):
        with open(root / "bench" / f"run{rank:04d}" / "metrics.jsonl", "a") as handle:
            handle.write(_lines(rank, per_run, per_run + extra))
    return runs * extra


RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="train rows in all")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="no-op re-ingests timed (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS / "store.json")
    parser.add_argument(
        "--quick", action="store_true", help="100,000 rows over 50 runs (for benchmarks/run_all.py --quick)"
    )
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.runs, args.repeats = 2_000, 10, 1
    if args.quick:
        args.rows, args.runs = 100_000, 50
    console = Console()

    root = Path(tempfile.mkdtemp(prefix="cmscale-bench-store-"))
    try:
        with console.status("writing run directories"):
            t = time.perf_counter()
            n_train, n_eval = build(root, args.rows, args.runs)
            build_s = time.perf_counter() - t
        bytes_on_disk = sum(p.stat().st_size for p in root.rglob("metrics.jsonl"))

        cpu = time.process_time()
        first = ingest(root)
        first_cpu_s = time.process_time() - cpu  # all threads of this process (polars and DuckDB)
        assert first.train_rows == n_train and first.eval_rows == n_eval, first.to_dict()
        noop = [ingest(root) for _ in range(args.repeats)]
        assert all(r.bytes_parsed == 0 and not r.changed for r in noop)
        noop_s = statistics.median(r.seconds for r in noop)

        per_run = args.rows // args.runs
        appended_runs = max(1, args.runs // 10)
        extra = max(1, per_run // 100)
        n_appended = append(root, appended_runs, per_run, extra)
        incremental = ingest(root)
        assert incremental.train_rows == n_appended, incremental.to_dict()

        t = time.perf_counter()
        count = query("SELECT count(*) FROM train", root, ingest_first=False).item()
        query_s = time.perf_counter() - t
        assert count == n_train + n_appended
    finally:
        shutil.rmtree(root, ignore_errors=True)

    total_first = n_train + n_eval
    result = {
        "rows": args.rows,
        "runs": args.runs,
        "train_rows": n_train,
        "eval_rows": n_eval,
        "metrics_bytes": bytes_on_disk,
        "build_s": round(build_s, 3),
        "first_ingest_s": round(first.seconds, 3),
        "first_ingest_rows_per_s": round(total_first / first.seconds),
        "first_ingest_mb_per_s": round(bytes_on_disk / first.seconds / 1e6, 1),
        "first_ingest_cpu_s": round(first_cpu_s, 3),
        "first_ingest_rows_per_cpu_s": round(total_first / first_cpu_s),
        "noop_reingest_s": round(noop_s, 4),
        "noop_over_first": round(noop_s / first.seconds, 4),
        "incremental_rows": n_appended,
        "incremental_runs": appended_runs,
        "incremental_ingest_s": round(incremental.seconds, 3),
        "count_query_s": round(query_s, 3),
        "goal_rows_per_s": 200_000,
        "meets_goal": total_first / first.seconds >= 200_000 and noop_s < 0.1 * first.seconds,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    result["summary"] = {
        key: result[key]
        for key in (
            "train_rows",
            "first_ingest_rows_per_s",
            "first_ingest_rows_per_cpu_s",
            "noop_over_first",
            "meets_goal",
        )
    }
    table = Table(title=f"results store: {args.rows:,} train rows over {args.runs} runs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("first ingest", f"{first.seconds:.2f} s")
    table.add_row("first ingest rows/s (train + eval)", f"{result['first_ingest_rows_per_s']:,}")
    table.add_row("first ingest MB/s of metrics.jsonl", f"{result['first_ingest_mb_per_s']}")
    table.add_row("first ingest CPU time (all threads)", f"{first_cpu_s:.2f} s")
    table.add_row("first ingest rows per CPU second", f"{result['first_ingest_rows_per_cpu_s']:,}")
    table.add_row(f"no-op re-ingest (median of {args.repeats})", f"{noop_s * 1000:.0f} ms")
    table.add_row("no-op / first", f"{result['noop_over_first']:.1%}")
    table.add_row(f"incremental: {n_appended:,} rows appended to {appended_runs} runs", f"{incremental.seconds:.2f} s")
    table.add_row("goal met (>= 200k rows/s, no-op < 10%)", str(result["meets_goal"]))
    table.add_row("load average (1 min) at the end", f"{result['load_avg_1m']}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
