"""``cmscale tune``: run an Optuna search (``run SPEC``), follow it (``status NAME``), export its
best configuration (``best NAME --write run.toml``)."""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from cmscale.cli.options import (
    JSON_OPTION,
    ROOT_OPTION,
    console,
    err_console,
    json_option,
    parse_overrides,
    print_table,
    set_option,
    spec_error,
)
from cmscale.cli.sweep import ingest_results
from cmscale.cluster.executors import EXECUTORS, detaches, in_process
from cmscale.config import ConfigError
from cmscale.rundir import JOURNAL_FILE


@click.group("tune")
def tune_group() -> None:
    """Optuna searches: each trial is a cmscale run; workers on SLURM (job array) or locally."""


def _counts_line(counts: dict[str, int], used: int, n_trials: int) -> str:
    states = ", ".join(f"{state} {count}" for state, count in counts.items()) or "no trials yet"
    return f"{used}/{n_trials} trials used: {states}"


TUNE_KEYS = ("the spec's own keys, dotted: n_trials=20, base.batch_size=64 (every trial's run), "
             "objective.metrics=[\"fid_1step\"], sampler.seed=1, executor.timeout_min=30")


def _worker_error(error: Exception) -> str:
    """One line for a dead worker: a raised exception's last line (the error itself), else the
    first (submitit's "has not produced any output (state: ...)" for a killed process)."""
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return repr(error)
    if any(line.lstrip().startswith("Traceback") for line in lines):
        return lines[-1].strip()
    return " ".join(text.split("Error stream produced")[0].split())


def _follow(spec, root: Path, jobs: list, poll_s: float, out=console) -> list[dict]:
    """Print the state counts whenever they change, until every worker has ended; returns the
    workers that died ({"job_id", "error"})."""
    from cmscale.tune.study import budget_used, load_study, state_counts

    study = load_study(spec, root)
    last = None
    try:
        while True:
            finished = all(job.done() for job in jobs)
            line = _counts_line(state_counts(study), budget_used(study), spec.n_trials)
            if line != last:
                out.print(f"  {line}")
                last = line
            if finished:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for job in jobs:
            job.cancel(check=False)
        console.print(
            "[yellow]stopped; the workers were cancelled. Run the same command again to continue the study.[/yellow]"
        )
        raise SystemExit(130) from None
    dead = []
    for job in jobs:
        try:
            job.result()
        except Exception as error:  # noqa: BLE001 - report each dead worker, keep the others' results
            dead.append({"job_id": str(job.job_id), "error": _worker_error(error)})
    return dead


@tune_group.command("run")
@click.argument("spec_path", type=click.Path(path_type=Path))
@ROOT_OPTION
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    default=None,
    help="local: processes on this machine; slurm: a job array; debug: in this process. Default: the spec's "
         "executor.name.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Workers pulling trials. Default: the spec's workers."
)
@click.option(
    "--trials",
    "n_trials",
    type=click.IntRange(min=1),
    default=None,
    help="Trials in the study in all. Default: the spec's n_trials.",
)
@click.option("--profile", default=None, help="SLURM profile name (slurm/profiles/NAME.toml) or path.")
@click.option(
    "--wait/--no-wait", default=None, help="SLURM: follow the workers until they end (local and debug always wait)."
)
@set_option("--set n_trials=20 --set base.batch_size=64")
@json_option("Print the study's summary (counts, best trials, dead workers) as JSON.")
@click.option("--new-version", is_flag=True,
              help="SPEC changes a study already started under its name: add its trials to the study.")
def run_command(
    spec_path: Path,
    root: Path,
    executor: str | None,
    workers: int | None,
    n_trials: int | None,
    profile: str | None,
    wait: bool | None,
    overrides: tuple[str, ...],
    as_json: bool,
    new_version: bool,
) -> None:
    """Start or continue the study of SPEC: workers pull trials until it has N trials (COMPLETE,
    PRUNED, RUNNING, or FAIL not retried). Re-running continues it; finished trials are never redone.

    Exits 1 naming them when workers died (a trial's own failure is a FAIL trial, not a dead worker)."""
    from cmscale.tune.spec import load_tune_spec
    from cmscale.tune.storage import TuneError
    from cmscale.tune.study import create_study, pruning_note, study_summary
    from cmscale.tune.worker import launch_workers

    given = parse_overrides(overrides)
    out = err_console if as_json else console
    try:
        spec = load_tune_spec(spec_path, given)
    except ConfigError as error:
        raise spec_error(error, given, TUNE_KEYS) from None
    try:
        spec = spec.model_copy(update={"n_trials": n_trials or spec.n_trials, "workers": workers or spec.workers})
        note = pruning_note(spec)
        if note:
            out.print(f"[yellow]{note}[/yellow]")
        create_study(spec, root, spec_path=str(Path(spec_path).resolve()), new_version=new_version)
        executor = executor or spec.executor.name
        jobs = launch_workers(spec, root, executor, spec.workers, profile)
    except (ConfigError, TuneError) as error:
        raise click.ClickException(str(error)) from None
    storage = spec.storage or f"{Path(root).resolve() / spec.name / JOURNAL_FILE}"
    out.print(f"study {spec.name}: {spec.n_trials} trials, {spec.workers} {executor} worker(s); storage {storage}")
    payload = {"study": spec.name, "executor": executor, "workers": spec.workers, "storage": storage,
               "overrides": given}
    if detaches(executor):
        payload["array_job_id"] = jobs[0].job_id.split("_")[0]
        out.print(f"  submitted array {payload['array_job_id']} ({len(jobs)} tasks)")
        if not wait:
            out.print(f"  follow with `cmscale tune status {spec.name}`")
            if as_json:
                click.echo(json.dumps(payload | {"jobs": [str(job.job_id) for job in jobs]}, indent=2))
            return
    dead: list[dict] = []
    if not in_process(executor):
        dead = _follow(spec, root, jobs, poll_s=5.0 if detaches(executor) else 2.0, out=out)
        # Drop the finished jobs now: submitit's LocalJob.__del__ fails noisily at interpreter exit.
        jobs.clear()
        gc.collect()
    ingest_results(root)
    summary = study_summary(root, spec.name)
    if as_json:
        click.echo(json.dumps(payload | summary | {"dead_workers": dead}, indent=2, default=str))
    else:
        _print_summary(summary)
    if dead:
        for worker in dead:
            out.print(f"[red]worker {worker['job_id']} died:[/red] {worker['error']}", highlight=False,
                      soft_wrap=True)
        out.print(f"[red]{len(dead)} of {spec.workers} worker(s) died[/red]; their logs are under "
                  f"{Path(root) / spec.name}/_submitit/. Run the same command again to continue the study.")
        raise click.exceptions.Exit(1)


def _print_summary(summary: dict) -> None:
    console.print(
        f"study {summary['study']}: " + _counts_line(summary["counts"], summary["budget_used"], summary["n_trials"])
    )
    if not summary["best"]:
        console.print("  no complete trial yet")
        return
    metrics = summary["metrics"]
    title = "best trial" if len(metrics) == 1 else f"Pareto front ({len(summary['best'])} trials)"
    table = Table(title=f"{title}: " + ", ".join(f"{m} ({d})" for m, d in zip(metrics, summary["directions"])))
    for column in ("trial", "run", *metrics, "params"):
        table.add_column(column, justify="right" if column in metrics or column == "trial" else "left")
    for trial in summary["best"]:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial["params"].items())
        table.add_row(str(trial["number"]), trial["run_id"], *(f"{v:.4g}" for v in trial["values"]), params)
    print_table(table)


@tune_group.command("status")
@click.argument("name")
@ROOT_OPTION
@JSON_OPTION
def status_command(name: str, root: Path, as_json: bool) -> None:
    """Counts of trials per state and the best trial (or the Pareto front) of study NAME."""
    from cmscale.tune.storage import TuneError
    from cmscale.tune.study import study_summary

    try:
        summary = study_summary(root, name)
    except TuneError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_summary(summary)


@tune_group.command("best")
@click.argument("name")
@ROOT_OPTION
@click.option(
    "--write", "write_path", type=click.Path(path_type=Path), default=None, help="Write the run config as TOML here."
)
@click.option(
    "--trial",
    "trial_number",
    type=int,
    default=None,
    help="This trial instead of the best (for a Pareto front: pick one from `tune status`).",
)
@json_option("Print the trial (number, values, params) and its run config as JSON.")
def best_command(name: str, root: Path, write_path: Path | None, trial_number: int | None, as_json: bool) -> None:
    """The best trial's run config (TOML for `cmscale train`). Multi-objective: the Pareto-front
    trial with the best first metric unless --trial is given."""
    import tomli_w

    from cmscale.tune.storage import TuneError
    from cmscale.tune.study import best_run_config

    try:
        config, trial = best_run_config(root, name, trial_number)
    except TuneError as error:
        raise click.ClickException(str(error)) from None
    header = (f"# best config of study {name}: trial {trial.number}, values {trial.values}, "
              f"params {json.dumps(trial.params)}\n")
    text = header + tomli_w.dumps(config)
    if write_path is not None:
        write_path.parent.mkdir(parents=True, exist_ok=True)
        write_path.write_text(text)
    if as_json:
        click.echo(json.dumps({"study": name, "trial": trial.number, "values": trial.values, "params": trial.params,
                               "config": config, "written": str(write_path) if write_path else None},
                              indent=2, default=str))
    elif write_path is None:
        click.echo(text)
    else:
        console.print(f"wrote {write_path} (trial {trial.number}, values {trial.values})")


if __name__ == "__main__":
    sys.exit(tune_group())
