"""Fit benchmark: timing of fits with 1,000 clustered-bootstrap draws, and CI coverage over 200 replicates.

Timing (goal: < 5 s each on 2 cores):
  * saturating law, 60 points (20 runs x 3 evals), fit + 1,000 bootstrap draws;
  * joint law, 250 points (50 runs x 5 evals), fit + 1,000 bootstrap draws.

Coverage (goal: the 95% bootstrap CI for alpha covers the truth in >= 88% of replicates):
  200 seeded replicates of each law at multiplicative noise 0.03, 200 bootstrap draws per replicate
  (fewer draws than the timing runs so the study fits in minutes; it measures the same interval).

    python benchmarks/bench_fit.py              # timing + 200-replicate coverage
    python benchmarks/bench_fit.py --quick      # timing + 40-replicate coverage
    python benchmarks/bench_fit.py --replicates 0   # timing only
    python benchmarks/bench_fit.py --laws saturating --noise 0.01,0.03,0.1 --out fit_noise.json

Writes benchmarks/results/fit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cmscale.analysis.fit import fit_with_bootstrap
from cmscale.analysis.synthetic import coverage_study, joint_data, saturating_data

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
GOAL_S = 5.0
COVERAGE_GOAL = 0.88


def time_fit(form: str, n_draws: int, repeats: int) -> dict:
    data = saturating_data(n_runs=20, evals_per_run=3, seed=0) if form == "saturating" else joint_data(seed=0)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fit = fit_with_bootstrap(form, data.X, data.y, data.groups, n_draws=n_draws, seed=0)
        times.append(time.perf_counter() - started)
    # CPU seconds of a single-process run: independent of what else shares the machine
    started = time.process_time()
    fit_with_bootstrap(form, data.X, data.y, data.groups, n_draws=n_draws, seed=0, n_jobs=1)
    cpu = time.process_time() - started
    return {
        "form": form,
        "n_points": int(data.y.size),
        "n_groups": int(len(set(data.groups))),
        "n_draws": n_draws,
        "seconds": min(times),
        "seconds_all": times,
        "cpu_seconds_single_process": cpu,
        "status": fit.status,
        "bootstrap_statuses": fit.bootstrap.status_counts(),
        "alpha": fit.params["alpha"],
        "alpha_ci": list(fit.ci["alpha"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 coverage replicates instead of 200")
    parser.add_argument("--replicates", type=int, default=None, help="coverage replicates per law (0: skip)")
    parser.add_argument("--draws", type=int, default=1000, help="bootstrap draws in the timing runs")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (the best is reported)")
    parser.add_argument("--noise", default="0.03", help="comma-separated noise levels for the coverage study")
    parser.add_argument("--laws", default="saturating,joint", help="comma-separated laws for the coverage study")
    parser.add_argument("--out", default="fit.json", help="result file name under benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.replicates, args.draws, args.repeats = 2, 50, 1
    replicates = args.replicates if args.replicates is not None else (40 if args.quick else 200)
    console = Console()
    cores = os.cpu_count() or 1

    timing = [time_fit(form, args.draws, args.repeats) for form in ("saturating", "joint")]
    table = Table(title=f"fit + {args.draws} bootstrap draws ({cores} cores, load average {os.getloadavg()[0]:.1f})")
    for column in (
        "law",
        "points",
        "runs",
        "wall s",
        f"goal < {GOAL_S:g} s",
        "CPU s (1 process)",
        "alpha [95% CI]",
        "draw statuses",
    ):
        table.add_column(column)
    for row in timing:
        table.add_row(
            row["form"],
            str(row["n_points"]),
            str(row["n_groups"]),
            f"{row['seconds']:.2f}",
            "yes" if row["seconds"] < GOAL_S else "NO",
            f"{row['cpu_seconds_single_process']:.2f}",
            f"{row['alpha']:.4f} [{row['alpha_ci'][0]:.4f}, {row['alpha_ci'][1]:.4f}]",
            str(row["bootstrap_statuses"]),
        )
    console.print(table)

    coverage = []
    if replicates > 0:
        for form in args.laws.split(","):
            for noise in (float(v) for v in args.noise.split(",")):
                started = time.perf_counter()
                study = coverage_study(form, replicates, noise=noise, n_draws=200, n_jobs=cores)
                study["seconds"] = time.perf_counter() - started
                coverage.append(study)
        table = Table(title=f"95% CI coverage over {replicates} seeded replicates (200 draws each)")
        for column in (
            "law",
            "noise",
            "parameter",
            "truth",
            "coverage",
            f"goal >= {COVERAGE_GOAL:.0%}",
            "median estimate",
            "sd",
            "seconds",
        ):
            table.add_column(column)
        for study in coverage:
            names = ["E", "alpha"] if study["form"] == "saturating" else ["E", "alpha", "beta"]
            for name in names:
                entry = study[name]
                table.add_row(
                    study["form"],
                    f"{study['noise']:g}",
                    name,
                    f"{entry['truth']:g}",
                    f"{entry['coverage']:.3f}",
                    ("yes" if entry["coverage"] >= COVERAGE_GOAL else "NO") if name == "alpha" else "",
                    f"{entry['median_estimate']:.4g}",
                    f"{entry['std_estimate']:.3g}",
                    f"{study['seconds']:.0f}",
                )
        console.print(table)

    summary = {f"{row['form']}_fit_{row['n_draws']}_draws_s": round(row["seconds"], 3) for row in timing}
    summary.update(
        {f"{row['form']}_cpu_s_single_process": round(row["cpu_seconds_single_process"], 3) for row in timing}
    )
    summary.update({f"{s['form']}_alpha_coverage_noise{s['noise']:g}": s["alpha"]["coverage"] for s in coverage})
    summary.update(
        {f"joint_beta_coverage_noise{s['noise']:g}": s["beta"]["coverage"] for s in coverage if s["form"] == "joint"}
    )
    if coverage:
        summary["coverage_replicates"] = replicates
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.out
    out.write_text(
        json.dumps(
            {
                "cores": cores,
                "load_average_1m_at_end": os.getloadavg()[0],
                "goal_s": GOAL_S,
                "coverage_goal": COVERAGE_GOAL,
                "timing": timing,
                "coverage": coverage,
                "summary": summary,
            },
            indent=2,
            default=float,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
