"""``cmscale sweep``: plan, launch, status, cancel and relaunch sweeps."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from cmscale.cli.options import (
    ROOT_OPTION,
    console,
    err_console,
    json_option,
    parse_overrides,
    print_table,
    set_option,
    spec_error,
)
from cmscale.cli.sweep_view import plan_table, print_report, progress_table, say_failures, watch_sweep
from cmscale.cluster.executors import EXECUTORS, detaches
from cmscale.config import ConfigError
from cmscale.rundir import SWEEP_FILE, RunState

SPEC_KEYS = ("the spec's own keys, dotted: presets=[\"xs\",\"s\"], seeds=[0,1], defaults.lr=2e-4 "
             "(every run), methods.ect.batch_size=64, teacher.budget_flops=1e12, executor.max_parallel=4")
SWEEP_SET = set_option("--set defaults.lr=2e-4 --set seeds=[0,1]")


def _load_and_plan(spec_path: Path, root: Path, overrides: dict | None = None, quiet: bool = False):
    from cmscale.sweep.plan import plan_sweep
    from cmscale.sweep.spec import load_spec

    try:
        spec = load_spec(spec_path, overrides)
    except ConfigError as error:
        raise spec_error(error, overrides or {}, SPEC_KEYS) from None
    try:
        with (err_console if quiet else console).status(f"planning {spec_path} (counting FLOPs per step)"):
            runs = plan_sweep(spec, root, source=_source(spec_path, overrides))
    except ConfigError as error:
        raise spec_error(error, overrides or {}, SPEC_KEYS) from None
    return spec, runs


def _source(spec_path: Path, overrides: dict | None) -> str:
    """How errors name the spec: its path, and the --set options that changed it."""
    given = " ".join(f"{key}={value}" for key, value in (overrides or {}).items())
    return f"{spec_path} (with --set {given})" if given else str(spec_path)


@click.group("sweep")
def sweep_group() -> None:
    """Sweeps: methods x presets x compute budgets x seeds, on SLURM or locally."""


@sweep_group.command("plan")
@click.argument("spec_path", type=click.Path(path_type=Path))
@ROOT_OPTION
@SWEEP_SET
@json_option("Print the planned runs as JSON.")
def plan_command(spec_path: Path, root: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Expand SPEC into runs (iso-FLOP iterations, deterministic run ids, teacher dependencies)."""
    spec, runs = _load_and_plan(spec_path, root, parse_overrides(overrides), quiet=as_json)
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
    print_table(plan_table(runs, f"sweep {spec.name}: {len(runs)} runs"))


def _report_json(report, sweep: str, executor: str, dry_run: bool) -> dict:
    return {"sweep": sweep, "executor": executor, "dry_run": dry_run, "submitted": report.submitted,
            "skipped": report.skipped, "sbatch_calls": report.sbatch_calls, "arrays": report.arrays,
            "scripts": report.scripts}


def _follow(root: Path, sweep: str, ingest: bool, timeout_s: float | None = None, out=console) -> list:
    """Follow the sweep until its runs end (the poll interval backs off while nothing changes);
    returns the final states."""
    from cmscale.sweep.launch import wait_for_sweep
    from cmscale.sweep.status import count_states

    last: dict[str, int] = {}
    started = time.time()

    def on_poll(states):
        counts = count_states(states)
        if counts != last:  # one line per change, with the time since following began
            out.print(
                f"  [{time.time() - started:6.0f}s] " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            )
            last.clear()
            last.update(counts)
            if ingest:  # results land when runs end, which is when the counts change
                ingest_results(root)

    states = wait_for_sweep(root, sweep, poll_s=5.0, timeout_s=timeout_s, on_poll=on_poll)
    ingest_results(root)
    return states


def ingest_results(root: Path) -> None:
    """Copy new run metrics into the root's DuckDB store (imported late: the store pulls in duckdb)."""
    from cmscale.results import ingest

    ingest(root)


def _finish(report, sweep: str, root: Path, executor: str, wait: bool, wait_timeout: float | None,
            as_json: bool, payload: dict) -> None:
    """After a (re)launch: ingest, follow when asked, print the JSON, and exit 1 naming the runs
    that did not finish (local runs have ended by now; SLURM ones are known only with --wait)."""
    from cmscale.sweep.status import count_states, sweep_states

    out = err_console if as_json else console
    states = None
    if not detaches(executor):
        ingest_results(root)
        states = sweep_states(root, sweep)
        # the runs this launch ran, and those it skipped because their teacher failed
        mine = set(report.submitted) | {run for run, why in report.skipped.items() if "did not finish" in why}
        states = [state for state in states if state.run_id in mine]
    elif wait:
        states = _follow(root, sweep, ingest=True, timeout_s=wait_timeout, out=out)
    bad = [state for state in states or [] if state.state != RunState.DONE]
    for state in bad:  # a run never started says why it was skipped
        if state.reason is None and state.run_id in report.skipped:
            state.reason = f"skipped: {report.skipped[state.run_id]}"
    if states is not None:
        payload |= {"counts": count_states(states),
                    "failed": [{"run_id": s.run_id, "state": s.state, "reason": s.reason} for s in bad]}
    if as_json:
        click.echo(json.dumps(payload, indent=2, default=str))
    if bad:
        say_failures(bad, sweep, out)
        raise click.exceptions.Exit(1)


@sweep_group.command("launch")
@click.argument("spec_path", type=click.Path(path_type=Path))
@ROOT_OPTION
@click.option("--executor", type=click.Choice(EXECUTORS), default=None, help="Default: the spec's executor.name.")
@click.option("--profile", default=None, help="SLURM profile name (slurm/profiles/NAME.toml) or path.")
@SWEEP_SET
@click.option("--dry-run", is_flag=True,
              help="Select the runs a launch would submit (done, queued and running ones skipped) and write the "
                   "sbatch scripts it would submit (SLURM) without submitting anything.")
@click.option("--scripts-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="With --dry-run: the folder for the sbatch scripts.  [default: ROOT/<sweep>/_dry_run]")
@click.option("--wait", is_flag=True, help="Follow the runs until they finish, ingesting results as they land.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=None,
              help="With --wait: stop following after this many seconds (the runs go on).")
@click.option("--new-version", is_flag=True,
              help="SPEC changes a sweep already launched under its name: add its runs to the sweep.")
@json_option("Print what was submitted (and, once runs have ended, their counts and failures) as JSON.")
def launch_command(spec_path: Path, root: Path, executor: str | None, profile: str | None, overrides: tuple[str, ...],
                   dry_run: bool, scripts_dir: Path | None, wait: bool, wait_timeout: float | None,
                   new_version: bool, as_json: bool) -> None:
    """Submit SPEC's runs: teachers first, students after them. Runs already done or queued are skipped.

    Exits 1 and names the runs that did not finish: local runs always (they have ended when it
    returns), SLURM runs with --wait."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmscale.sweep.launch import submit_runs

    given = parse_overrides(overrides)
    spec, runs = _load_and_plan(spec_path, root, given, quiet=as_json)
    executor = executor or spec.executor.name
    out = err_console if as_json else console
    # A progress bar over the SLURM submissions; local runs print a line as each one finishes.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=out, transient=True, disable=not (detaches(executor) and out.is_terminal)) as progress:
        task = progress.add_task("submitting arrays", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            report = submit_runs(runs, spec, root, executor, profile, dry_run=dry_run, spec_path=spec_path,
                                 on_finish=lambda run, state: out.print(f"  {state:>6}  {run.run_id}"),
                                 on_progress=on_progress, script_dir=scripts_dir, overrides=given,
                                 new_version=new_version)
        except ConfigError as error:
            raise click.ClickException(str(error)) from None
    payload = _report_json(report, spec.name, executor, dry_run) | {"overrides": given}
    if not as_json:
        print_report(report, dry_run, executor)
    if dry_run:
        if as_json:
            click.echo(json.dumps(payload, indent=2, default=str))
        return
    _finish(report, spec.name, root, executor, wait, wait_timeout, as_json, payload)


@sweep_group.command("status")
@click.argument("name")
@ROOT_OPTION
@click.option("--watch", is_flag=True,
              help="Keep a live table of the running runs (progress, images/s, loss, ETA) and the state counts, "
                   "until every run has ended or Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="With --watch: seconds between refreshes.")
@click.option("--refreshes", type=click.IntRange(min=1), default=None,
              help="With --watch: stop after this many refreshes (default: until the runs end).")
@json_option("Print the states as JSON (with --watch: one JSON line per refresh).")
def status_command(name: str, root: Path, watch: bool, interval: float, refreshes: int | None, as_json: bool) -> None:
    """Count runs per state (from run directories and the scheduler) and list failures."""
    from cmscale.rundir import sweep_dir
    from cmscale.sweep.status import count_states, sweep_progress, sweep_states

    if not (sweep_dir(root, name) / SWEEP_FILE).is_file():
        known = sorted(path.parent.name for path in Path(root).glob(f"*/{SWEEP_FILE}"))
        raise click.ClickException(
            f"no sweep {name!r} under {root} ({sweep_dir(root, name) / SWEEP_FILE} missing); "
            + (f"sweeps there: {', '.join(known)}" if known else "launch one with `cmscale sweep launch SPEC`")
            + (" (or pass --root)" if not known else "")
        )
    if watch:
        watch_sweep(root, name, interval, refreshes, as_json)
        return
    try:
        states = sweep_states(root, name)
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None
    counts = count_states(states)
    if as_json:
        running = {run.run_id: run.as_dict() for run in sweep_progress(root, name, states)}
        click.echo(json.dumps({"sweep": name, "counts": counts,
                               "runs": [s.as_dict() | {"progress": running.get(s.run_id)} for s in states]},
                              indent=2))
        return
    console.print(f"sweep {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    running = sweep_progress(root, name, states)
    if running:
        print_table(progress_table(running, bars=False))
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
@json_option("Print the cancelled job ids as JSON.")
def cancel_command(name: str, root: Path, as_json: bool) -> None:
    """scancel only this sweep's jobs."""
    from cmscale.sweep.launch import cancel_sweep

    try:
        cancelled = cancel_sweep(root, name)
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({"sweep": name, "cancelled": cancelled}, indent=2))
        return
    console.print(f"cancelled {len(cancelled)} job(s): {' '.join(cancelled) or '-'}")


@sweep_group.command("relaunch")
@click.argument("name")
@ROOT_OPTION
@click.option("--failed", "include_failed", is_flag=True, required=True, help="Resubmit failed and lost runs.")
@click.option("--executor", type=click.Choice(EXECUTORS), default=None)
@click.option("--profile", default=None)
@click.option("--wait", is_flag=True, help="SLURM: follow the runs until they finish (local runs always finish first).")
@click.option("--wait-timeout", type=click.FloatRange(min=0), default=None,
              help="With --wait: stop following after this many seconds (the runs go on).")
@json_option("Print what was resubmitted (and, once runs have ended, their counts and failures) as JSON.")
def relaunch_command(name: str, root: Path, include_failed: bool, executor: str | None, profile: str | None,
                     wait: bool, wait_timeout: float | None, as_json: bool) -> None:
    """Resubmit the failed and lost runs of sweep NAME; they resume from their newest checkpoint.

    The plan comes from the spec as launched (with its --set overrides), kept in sweep.json."""
    from cmscale.sweep.launch import submit_runs
    from cmscale.sweep.plan import plan_sweep, read_sweep_file, sweep_dir
    from cmscale.sweep.spec import load_spec, parse_spec

    try:
        stored = read_sweep_file(root, name)
    except FileNotFoundError as error:
        raise click.ClickException(str(error)) from None
    spec_path = Path(stored.get("spec_path", ""))
    if stored.get("spec") is None and not spec_path.is_file():
        raise click.ClickException(
            f"the spec of sweep {name!r} is not at {spec_path}; relaunch with `cmscale sweep launch SPEC`"
        )
    # Default to how the sweep was launched, not to the spec's executor (often "local").
    executor = executor or stored.get("executor")
    profile = profile or stored.get("profile")
    overrides = stored.get("overrides") or {}
    out = err_console if as_json else console
    try:
        if stored.get("spec") is not None:
            spec = parse_spec(stored["spec"], f"{sweep_dir(root, name) / SWEEP_FILE} (the spec as launched)")
        else:
            spec = load_spec(spec_path)
        runs = plan_sweep(spec, root, source=str(spec_path))
        executor = executor or spec.executor.name
        report = submit_runs(
            runs,
            spec,
            root,
            executor,
            profile,
            wanted=frozenset({RunState.PLANNED, RunState.FAILED, RunState.LOST}),
            spec_path=spec_path,
            overrides=overrides,
            on_finish=lambda run, state: out.print(f"  {state:>6}  {run.run_id}"),
        )
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    if not as_json:
        print_report(report, dry_run=False, executor=executor)
    payload = _report_json(report, spec.name, executor, dry_run=False) | {"overrides": overrides}
    _finish(report, spec.name, root, executor, wait, wait_timeout, as_json, payload)


if __name__ == "__main__":
    sys.exit(sweep_group())
