"""``cmscale sweep``: plan, launch, status, cancel and relaunch sweeps."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from cmscale.cli.options import ROOT_OPTION, console, json_option, print_table
from cmscale.cluster.executors import EXECUTORS, detaches
from cmscale.config import ConfigError
from cmscale.rundir import RunState, budget_in_flops


def _load_and_plan(spec_path: Path, root: Path):
    from cmscale.sweep.plan import plan_sweep
    from cmscale.sweep.spec import load_spec

    try:
        spec = load_spec(spec_path)
        with console.status(f"planning {spec_path} (counting FLOPs per step)"):
            runs = plan_sweep(spec, root, source=str(spec_path))
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    return spec, runs


def _plan_table(runs, title: str) -> Table:
    from cmscale.data.datasets import dataset_channels
    from cmscale.models.flops import meta_copy
    from cmscale.models.presets import build_unet
    from cmscale.models.unet import count_parameters

    params: dict[tuple, int] = {}
    table = Table(title=title)
    for column in ("run", "method", "preset", "params", "budget FLOPs", "iterations", "est. images seen", "after"):
        table.add_column(column, justify="left" if column in ("run", "method", "preset", "after") else "right")
    for run in runs:
        config = run.config
        key = (config.preset, config.resolution)
        if key not in params:
            channels = dataset_channels(config.dataset, config.vae_path)
            params[key] = count_parameters(
                meta_copy(lambda c=config, ch=channels: build_unet(c.preset, c.resolution, ch))
            )
        budget = budget_in_flops(config.budget_flops, run.iterations, run.flops_per_step)
        table.add_row(
            run.run_id,
            config.method,
            config.preset,
            f"{params[key]:,}",
            f"{budget:.3g}",
            f"{run.iterations:,}",
            f"{run.images_seen:,}",
            ", ".join(run.depends_on) or "-",
        )
    return table


@click.group("sweep")
def sweep_group() -> None:
    """Sweeps: methods x presets x compute budgets x seeds, on SLURM or locally."""


@sweep_group.command("plan")
@click.argument("spec_path", type=click.Path(path_type=Path))
@ROOT_OPTION
@json_option("Print the planned runs as JSON.")
def plan_command(spec_path: Path, root: Path, as_json: bool) -> None:
    """Expand SPEC into runs (iso-FLOP iterations, deterministic run ids, teacher dependencies)."""
    spec, runs = _load_and_plan(spec_path, root)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "run_id": r.run_id,
                        "method": r.config.method,
                        "preset": r.config.preset,
                        "seed": r.config.seed,
                        "budget_flops": r.config.budget_flops,
                        "iterations": r.iterations,
                        "flops_per_step": r.flops_per_step,
                        "images_seen": r.images_seen,
                        "stage": r.stage,
                        "depends_on": r.depends_on,
                    }
                    for r in runs
                ],
                indent=2,
            )
        )
        return
    print_table(_plan_table(runs, f"sweep {spec.name}: {len(runs)} runs"))


def _print_report(report, dry_run: bool) -> None:
    verb = "would submit" if dry_run else "submitted"
    console.print(
        f"{verb} {len(report.submitted)} runs in {report.sbatch_calls} array submission(s); skipped "
        f"{len(report.skipped)}"
    )
    for array in report.arrays:
        console.print(
            f"  array {array['array_job_id']}: {array['tasks']} tasks"
            + (f", {array['dependency']}" if array["dependency"] else "")
        )


def _follow(root: Path, sweep: str, ingest: bool, timeout_s: float | None = None) -> None:
    from cmscale.sweep.launch import wait_for_sweep
    from cmscale.sweep.status import count_states

    last: dict[str, int] = {}
    started = time.time()

    def on_poll(states):
        counts = count_states(states)
        if counts != last:  # one line per change, with the time since following began
            console.print(
                f"  [{time.time() - started:6.0f}s] " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            )
            last.clear()
            last.update(counts)
            if ingest:  # results land when runs end, which is when the counts change
                ingest_results(root)

    states = wait_for_sweep(root, sweep, poll_s=5.0, timeout_s=timeout_s, on_poll=on_poll)
    ingest_results(root)
    bad = [s for s in states if s.state != RunState.DONE]
    if bad:
        console.print(f"[red]{len(bad)} runs did not finish[/red]; see `cmscale sweep status {sweep}`")
        raise click.exceptions.Exit(1)


def ingest_results(root: Path) -> None:
    """Copy new run metrics into the root's DuckDB store (imported late: the store pulls in duckdb)."""
    from cmscale.results import ingest

    ingest(root)


@sweep_group.command("launch")
@click.argument("spec_path", type=click.Path(path_type=Path))
@ROOT_OPTION
@click.option("--executor", type=click.Choice(EXECUTORS), default=None, help="Default: the spec's executor.name.")
@click.option("--profile", default=None, help="SLURM profile name (slurm/profiles/NAME.toml) or path.")
@click.option("--dry-run", is_flag=True, help="Plan and build the submissions without submitting.")
@click.option("--wait", is_flag=True, help="Follow the runs until they finish, ingesting results as they land.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=None,
              help="With --wait: stop following after this many seconds (the runs go on).")
@click.option("--new-version", is_flag=True,
              help="SPEC changes a sweep already launched under its name: add its runs to the sweep.")
def launch_command(spec_path: Path, root: Path, executor: str | None, profile: str | None, dry_run: bool, wait: bool,
                   wait_timeout: float | None, new_version: bool) -> None:
    """Submit SPEC's runs: teachers first, students after them. Runs already done or queued are skipped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmscale.sweep.launch import submit_runs

    spec, runs = _load_and_plan(spec_path, root)
    executor = executor or spec.executor.name
    # A progress bar over the SLURM submissions; local runs print a line as each one finishes.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not detaches(executor)) as progress:
        task = progress.add_task("submitting arrays", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            report = submit_runs(runs, spec, root, executor, profile, dry_run=dry_run, spec_path=spec_path,
                                 on_finish=lambda run, state: console.print(f"  {state:>6}  {run.run_id}"),
                                 on_progress=on_progress, new_version=new_version)
        except ConfigError as error:
            raise click.ClickException(str(error)) from None
    _print_report(report, dry_run)
    if not dry_run:
        if not detaches(executor):  # local runs have ended by now; SLURM ones may be queued
            ingest_results(root)
        elif wait:
            _follow(root, spec.name, ingest=True, timeout_s=wait_timeout)


@sweep_group.command("status")
@click.argument("name")
@ROOT_OPTION
@json_option(None)
def status_command(name: str, root: Path, as_json: bool) -> None:
    """Count runs per state (from run directories and the scheduler) and list failures."""
    from cmscale.sweep.status import count_states, sweep_states

    try:
        states = sweep_states(root, name)
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None
    counts = count_states(states)
    if as_json:
        click.echo(json.dumps({"sweep": name, "counts": counts, "runs": [s.as_dict() for s in states]}, indent=2))
        return
    console.print(f"sweep {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    problems = [s for s in states if s.state in (RunState.FAILED, RunState.LOST)]
    if problems:
        table = Table(title="failed and lost runs")
        for column in ("run", "state", "job", "reason"):
            table.add_column(column)
        for state in problems:
            table.add_row(state.run_id, state.state, state.job_id or "-", state.reason or "-")
        print_table(table)


@sweep_group.command("cancel")
@click.argument("name")
@ROOT_OPTION
def cancel_command(name: str, root: Path) -> None:
    """scancel only this sweep's jobs."""
    from cmscale.sweep.launch import cancel_sweep

    try:
        cancelled = cancel_sweep(root, name)
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None
    console.print(f"cancelled {len(cancelled)} job(s): {' '.join(cancelled) or '-'}")


@sweep_group.command("relaunch")
@click.argument("name")
@ROOT_OPTION
@click.option("--failed", "include_failed", is_flag=True, required=True, help="Resubmit failed and lost runs.")
@click.option("--executor", type=click.Choice(EXECUTORS), default=None)
@click.option("--profile", default=None)
def relaunch_command(name: str, root: Path, include_failed: bool, executor: str | None, profile: str | None) -> None:
    """Resubmit the failed and lost runs of sweep NAME; they resume from their newest checkpoint."""
    from cmscale.sweep.launch import submit_runs
    from cmscale.sweep.plan import plan_sweep, read_sweep_file
    from cmscale.sweep.spec import load_spec

    try:
        stored = read_sweep_file(root, name)
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None
    spec_path = Path(stored.get("spec_path", ""))
    if not spec_path.is_file():
        raise click.ClickException(
            f"the spec of sweep {name!r} is not at {spec_path}; relaunch with `cmscale sweep launch SPEC`"
        )
    # Default to how the sweep was launched, not to the spec's executor (often "local").
    executor = executor or stored.get("executor")
    profile = profile or stored.get("profile")
    try:
        spec = load_spec(spec_path)
        runs = plan_sweep(spec, root, source=str(spec_path))
        report = submit_runs(
            runs,
            spec,
            root,
            executor or spec.executor.name,
            profile,
            wanted=frozenset({RunState.PLANNED, RunState.FAILED, RunState.LOST}),
            spec_path=spec_path,
        )
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    _print_report(report, dry_run=False)


if __name__ == "__main__":
    sys.exit(sweep_group())
