"""What ``cmscale sweep`` prints: the plan table, the launch report, the runs that did not finish,
the progress table of running runs and the live ``status --watch`` view."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.table import Table

from cmscale.cli.options import console
from cmscale.cluster.executors import detaches
from cmscale.rundir import budget_in_flops


def plan_table(runs, title: str) -> Table:
    from cmscale.data.datasets import dataset_channels
    from cmscale.models.flops import meta_copy
    from cmscale.models.presets import build_unet
    from cmscale.models.unet import count_parameters

    params: dict[tuple, int] = {}
    table = Table(title=title)
    for column in ("run", "method", "preset", "params", "FLOPs/step", "budget FLOPs", "iterations",
                   "est. images seen", "after"):
        table.add_column(column, justify="left" if column in ("run", "method", "preset", "after") else "right")
    for run in runs:
        config = run.config
        key = (config.preset, config.resolution, config.label_dim)
        if key not in params:
            channels = dataset_channels(config.dataset, config.vae_path)
            params[key] = count_parameters(meta_copy(
                lambda c=config, ch=channels: build_unet(c.network_preset(), c.resolution, ch, label_dim=c.label_dim)))
        budget = budget_in_flops(config.budget_flops, run.iterations, run.flops_per_step)
        table.add_row(
            run.run_id,
            config.method,
            config.preset,
            f"{params[key]:,}",
            f"{run.flops_per_step:.3g}",
            f"{budget:.3g}",
            f"{run.iterations:,}",
            f"{run.images_seen:,}",
            ", ".join(run.depends_on) or "-",
        )
    return table


def _skip_reason(why: str) -> str:
    """A skip reason without its run-specific part ("running as job 12_3" -> "running")."""
    return why.split(" as job ")[0].split(";")[0]


def print_report(report, dry_run: bool, executor: str) -> None:
    verb = "would submit" if dry_run else "submitted"
    how = f"in {report.sbatch_calls} array submission(s)" if detaches(executor) else f"to the {executor} executor"
    reasons: dict[str, int] = {}
    for why in report.skipped.values():
        reasons[_skip_reason(why)] = reasons.get(_skip_reason(why), 0) + 1
    skipped = ", ".join(f"{why}: {count}" for why, count in sorted(reasons.items()))
    console.print(f"{verb} {len(report.submitted)} runs {how}; skipped {len(report.skipped)}"
                  + (f" ({skipped})" if skipped else ""), highlight=False, soft_wrap=True)
    for array in report.arrays:
        console.print(
            f"  array {array['array_job_id']}: {array['tasks']} tasks"
            + (f", {array['dependency']}" if array["dependency"] else ""), highlight=False
        )
    if dry_run and report.scripts:
        console.print(f"wrote {len(report.scripts)} sbatch script(s) to {Path(report.scripts[0]).parent}/ "
                      "(dryrunN stands for the job id SLURM would assign)", highlight=False, soft_wrap=True)
    elif dry_run and report.submitted and not detaches(executor):
        console.print(f"the {executor} executor would run these as processes here: no sbatch scripts",
                      highlight=False)


def say_failures(bad: list, sweep: str, out) -> None:
    out.print(f"[red]{len(bad)} run(s) did not finish:[/red]")
    for state in bad:
        out.print(f"  {state.state:>7}  {state.run_id}" + (f": {state.reason}" if state.reason else ""),
                  highlight=False, soft_wrap=True)
    out.print(f"see `cmscale sweep status {sweep}`; rerun them with `cmscale sweep relaunch {sweep} --failed`",
              highlight=False, soft_wrap=True)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_table(progress, bars: bool) -> Table:
    """One row per running run: progress (a bar live, a percentage in print), step, images/s, loss, ETA."""
    from rich.progress_bar import ProgressBar

    table = Table(title=f"{len(progress)} running")
    for column in ("run", "progress", "step", "images/s", "loss", "ETA", "updated"):
        table.add_column(column, justify="left" if column in ("run", "progress") else "right", overflow="fold")
    now = time.time()
    for run in progress:
        if run.fraction is None:
            shown = "-"
        elif bars:
            shown = ProgressBar(total=1.0, completed=run.fraction, width=20)
        else:
            shown = f"{100 * run.fraction:.0f}%"
        table.add_row(
            run.run_id,
            shown,
            f"{run.step:,}/{run.total_steps:,}" if run.step is not None and run.total_steps else "-",
            f"{run.images_per_s:,.1f}" if run.images_per_s is not None else "-",
            f"{run.loss:.4g}" if run.loss is not None else "-",
            _duration(run.eta_s),
            f"{_duration(now - run.updated)} ago" if run.updated is not None else "-",
        )
    return table


def _watch_view(name: str, states, progress, interval: float):
    """The live view: state counts, then one row per running run with its progress and ETA."""
    from rich.console import Group
    from rich.text import Text

    from cmscale.sweep.status import count_states

    counts = count_states(states)
    header = Text(f"sweep {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                  + f"   (every {interval:g} s; Ctrl-C stops watching, the runs go on)")
    return Group(header, progress_table(progress, bars=True))


def watch_sweep(root: Path, name: str, interval: float, refreshes: int | None, as_json: bool) -> None:
    """Redraw the view every ``interval`` s until every run has ended, Ctrl-C, or ``refreshes`` draws."""
    from rich.live import Live

    from cmscale.rundir import TERMINAL_STATES
    from cmscale.sweep.status import count_states, sweep_progress, sweep_states

    drawn = 0

    def snapshot():
        states = sweep_states(root, name)
        return states, sweep_progress(root, name, states)

    states, progress = snapshot()
    if as_json:  # one JSON line per refresh (a stream a script can follow)
        while True:
            click.echo(json.dumps({"sweep": name, "time": time.time(), "counts": count_states(states),
                                   "running": [run.as_dict() for run in progress]}))
            drawn += 1
            if (refreshes is not None and drawn >= refreshes) or all(s.state in TERMINAL_STATES for s in states):
                return
            time.sleep(interval)
            states, progress = snapshot()
    try:
        with Live(_watch_view(name, states, progress, interval), console=console, auto_refresh=False,
                  transient=False) as live:
            while True:
                drawn += 1
                if (refreshes is not None and drawn >= refreshes) or all(
                        s.state in TERMINAL_STATES for s in states):
                    break
                time.sleep(interval)
                states, progress = snapshot()
                live.update(_watch_view(name, states, progress, interval), refresh=True)
    except KeyboardInterrupt:
        console.print("stopped watching; the runs go on")
