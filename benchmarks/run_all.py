"""Run every cmscale benchmark, print one summary table, write benchmarks/results/summary.json.

Each benchmark is its own script that prints a table and writes ``benchmarks/results/<name>.json``;
this runner starts each in a fresh process (so one cannot warm another's caches), records its wall
time and exit code, and gathers the headline figures from the JSON it wrote (its ``summary`` entry
when it has one). The demo benchmark times ``cmscale demo`` (full, or ``--quick``) in a temporary
results root.

    python benchmarks/run_all.py              # everything, full demo
    python benchmarks/run_all.py --quick      # smaller sizes and the quick demo
    python benchmarks/run_all.py --only fit,store
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent


def benchmark_commands(quick: bool, demo_root: Path) -> dict[str, list[str]]:
    python = sys.executable
    cmscale = str(Path(python).with_name("cmscale"))
    return {
        "train_step": [python, str(HERE / "bench_train_step.py"), *(["--quick"] if quick else [])],
        "jvp": [python, str(HERE / "bench_jvp.py"), *(["--quick"] if quick else [])],
        "store": [python, str(HERE / "bench_store.py"), *(["--quick"] if quick else [])],
        "launch": [python, str(HERE / "bench_launch.py"), *(["--quick"] if quick else [])],
        "eval": [python, str(HERE / "bench_eval.py"), *(["--quick"] if quick else [])],
        "fit": [python, str(HERE / "bench_fit.py"), *(["--quick"] if quick else [])],
        "trainer": [python, str(HERE / "bench_trainer.py"), *(["--quick"] if quick else [])],
        "bench_data": [python, str(HERE / "bench_data.py"), *(["--quick"] if quick else [])],
        "demo": [cmscale, "demo", "--out", str(demo_root), *(["--quick"] if quick else [])],
    }


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def headline(name: str) -> dict:
    """The figures a benchmark chose to headline (its JSON's ``summary``), or its whole JSON."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("summary", data) if isinstance(data, dict) else {"rows": len(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and the quick demo")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    console = Console()
    outcomes: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cmscale-demo-bench-") as demo_root:
        commands = benchmark_commands(args.quick, Path(demo_root))
        wanted = [name for name in args.only.split(",") if name] or list(commands)
        unknown = sorted(set(wanted) - set(commands))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(commands)}")
        for name in wanted:
            console.rule(f"benchmark {name}")
            started = time.perf_counter()
            completed = subprocess.run(commands[name], cwd=REPO, env=os.environ.copy())
            wall_s = time.perf_counter() - started
            outcomes[name] = {"command": commands[name], "exit_code": completed.returncode, "wall_s": round(wall_s, 2)}
            if name == "demo":
                outcomes[name]["summary"] = {"demo_wall_s": round(wall_s, 1), "quick": args.quick}
            else:
                outcomes[name]["summary"] = headline(name)

    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "quick": args.quick,
        "benchmarks": outcomes,
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    table = Table(title=f"cmscale benchmarks ({summary['commit']}, {os.cpu_count()} CPUs)")
    for column in ("benchmark", "exit", "wall s", "headline"):
        table.add_column(column)
    for name, outcome in outcomes.items():
        figures = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(outcome["summary"].items())[:6]
        )
        table.add_row(name, str(outcome["exit_code"]), f"{outcome['wall_s']:.1f}", figures or "-")
    console.print(table)
    console.print(f"wrote {RESULTS / 'summary.json'}")
    return 0 if all(outcome["exit_code"] == 0 for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
