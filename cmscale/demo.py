"""``cmscale demo``: the whole study on the embedded digits data, through the real code paths.

Teachers trained to a common iteration budget, ECT and sCD students at four sizes and three
iso-FLOP budgets, FID and KID evals at several fractions of each budget, ingestion into DuckDB,
fits and the HTML report: the same sweep planner, executors, store and analysis that a cluster
study uses, at a size that runs on a 2-core laptop. It ends with the eval noise floor (FID and KID
of real digits against other real digits at the evals' sample count), the yardstick for reading
differences between sizes.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from cmscale.rundir import RunState, atomic_write_json

DEMO_SPEC = "demo_digits.toml"
QUICK_SPEC = "demo_digits_quick.toml"
# Bootstrap draws per fit: the full demo uses the CLI default; the quick one fewer, since its
# report fits a few dozen laws in a run meant to take minutes.
DEMO_BOOTSTRAP_DRAWS = {"full": 500, "quick": 100}

EXAMPLE_QUERIES = [
    (
        "FID at 2 steps per method and size, at the largest budget",
        """SELECT r.method, r.preset, r.params, round(e.fid, 2) AS fid_2step, e.train_flops
FROM latest_eval e JOIN runs r USING (sweep, run_id)
WHERE r.sweep = '{sweep}' AND e.sampler_steps = 2
  AND r.budget_flops = (SELECT max(budget_flops) FROM runs WHERE sweep = '{sweep}' AND method = r.method)
ORDER BY r.method, r.params""",
    ),
    (
        "Teacher FID and KID (Heun sampler) per size, all trained for the same number of iterations",
        """SELECT r.preset, r.params, r.final_step AS iters, e.nfe, round(e.fid, 2) AS fid, round(e.kid, 1) AS kid,
       e.num_samples
FROM latest_eval e JOIN runs r USING (sweep, run_id)
WHERE r.sweep = '{sweep}' AND r.method = 'edm'
ORDER BY r.params""",
    ),
    (
        "Training FLOPs per step by method (the JVP and teacher forwards included)",
        """SELECT method, preset, any_value(json_extract(config_json, '$.flops_per_step'))::DOUBLE AS flops_per_step,
       count(*) AS runs
FROM runs WHERE sweep = '{sweep}' GROUP BY method, preset ORDER BY preset, flops_per_step""",
    ),
]


def print_sql(console, sql: str) -> None:
    """Print SQL exactly as written: soft_wrap keeps Rich from breaking a long line (inside a string
    literal, too) at the terminal width, so the text pastes back as the same query."""
    console.print(sql, style="dim", highlight=False, soft_wrap=True, markup=False)


def spec_path(quick: bool) -> Path:
    return Path(str(resources.files("cmscale.examples").joinpath(QUICK_SPEC if quick else DEMO_SPEC)))


def run_demo(out: Path, executor: str = "local", quick: bool = False, profile: str | None = None, console=None,
             overrides: dict | None = None) -> dict:
    """Run the demo end to end; returns paths, timings and the runs that did not finish.
    ``console`` is a rich Console; ``overrides`` are dotted spec settings (``--set``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmscale.analysis.render import write_report
    from cmscale.cluster.executors import detaches
    from cmscale.results import ingest, read_query
    from cmscale.rundir import TERMINAL_STATES
    from cmscale.sweep.launch import submit_runs, wait_for_sweep
    from cmscale.sweep.plan import plan_sweep
    from cmscale.sweep.spec import load_spec
    from cmscale.sweep.status import sweep_states

    console = console or Console()
    out = Path(out)
    started = time.time()
    path = spec_path(quick)
    spec = load_spec(path, overrides)
    console.rule(f"cmscale demo: {spec.name} ({'quick' if quick else 'full'}), results in {out}")
    with console.status("planning: counting FLOPs per training step for each method and size"):
        runs = plan_sweep(spec, out, source=str(path))
    teachers = sum(run.stage == 0 for run in runs)
    console.print(f"{len(runs)} runs: {teachers} EDM teachers, {len(runs) - teachers} students; executor {executor}")

    timings: dict[str, float] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("training and evaluating", total=len(runs))

        def on_finish(run, state):
            progress.advance(task)
            progress.console.print(f"  {state:>6}  {run.run_id}")

        report = submit_runs(runs, spec, out, executor, profile, on_finish=on_finish, spec_path=path,
                             overrides=overrides)
        ended_here = 0 if detaches(executor) else len(report.submitted)
        progress.update(task, completed=len(report.skipped) + ended_here)
        if detaches(executor):
            def on_poll(states):
                progress.update(task, completed=sum(s.state in TERMINAL_STATES for s in states))

            wait_for_sweep(out, spec.name, poll_s=3.0, max_poll_s=10.0, on_poll=on_poll)  # a short study: keep up
    timings["runs_s"] = time.time() - started

    with console.status("ingesting metrics into DuckDB"):
        ingest(out)
    with console.status("fitting power laws, frontier and teacher-student ratios; writing the report"):
        n_draws = DEMO_BOOTSTRAP_DRAWS["quick" if quick else "full"]
        report_paths = write_report(out, spec.name, out / "report" / spec.name, n_draws=n_draws)
    timings["total_s"] = time.time() - started

    console.rule("example SQL on " + str(out / "cmscale.duckdb"))
    for title, sql in EXAMPLE_QUERIES:
        sql = sql.format(sweep=spec.name)
        console.print(f"[bold]{title}[/bold]")
        print_sql(console, sql)
        console.print(read_query(sql, root=out).to_pandas().to_string(index=False))
        console.print()
    # soft_wrap: a path folded across lines cannot be copied or clicked
    console.print(f"report: [bold]{report_paths['html']}[/bold]  (markdown: {report_paths['md']})", soft_wrap=True)
    if n_draws < 1000:
        console.print(
            f"fits used {n_draws} bootstrap draws each; for 1,000: cmscale report {spec.name} --root {out} --out DIR"
        )
    floor = eval_noise_floor(runs)
    floor_path = Path(report_paths["html"]).parent / "noise_floor.json"
    atomic_write_json(floor_path, floor.to_json())
    console.print(
        f"eval noise floor: {floor.num_samples} real digits against the other {floor.reference_size}: "
        f"FID {floor.fid_mean:.2f} +- {floor.fid_std:.2f}, KID {floor.kid_mean:.1f} +- {floor.kid_std:.1f} "
        f"({floor.repeats} random splits); differences between sizes below the +- are noise", soft_wrap=True)
    console.print(f"demo finished in {timings['total_s']:.0f} s")
    failed = [{"run_id": s.run_id, "state": s.state, "reason": s.reason}
              for s in sweep_states(out, spec.name) if s.state != RunState.DONE]
    return {"report": report_paths, "timings": timings, "sweep": spec.name, "root": str(out),
            "noise_floor": floor.to_json(), "failed": failed}


def eval_noise_floor(runs):
    """The noise floor at the students' eval sample count (see :func:`cmscale.eval.fid.noise_floor`)."""
    from cmscale.data import load_dataset
    from cmscale.eval import eval_num_samples, feature_space
    from cmscale.eval.fid import noise_floor

    config = next(run.config for run in runs if run.stage == 1)
    data = load_dataset(config.dataset, path=config.data_path, resolution=config.resolution)
    space = feature_space(config.dataset, config.eval.extractor, config.eval.inception_weights)
    num_samples = min(eval_num_samples(config), len(data) // 2)
    return noise_floor(data, space, num_samples, kid_subsets=config.eval.kid_subsets, seed=config.eval.seed)
