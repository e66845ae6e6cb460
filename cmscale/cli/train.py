"""``cmscale train RUN.toml``: one training run from a TOML file (see :class:`cmscale.config.RunConfig`)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click

from cmscale.cli.options import ROOT_OPTION, parse_overrides
from cmscale.config import (
    ConfigError,
    RunConfig,
    load_run_config,
    resolve_path,
    safe_path_component,
)
from cmscale.rundir import DONE_FILE, RunState, read_json, write_status


def default_run_dir(config: RunConfig, toml_path: Path, root: Path) -> Path:
    """``<root>/<sweep>/<run_id>``, with the TOML file's stem as the run id when it names none."""
    run_id = config.run_id or toml_path.stem
    try:
        safe_path_component(run_id)
    except ValueError as error:
        raise click.ClickException(f"{toml_path}: run_id (from the file name): {error}; set run_id in the file "
                                   "or give --out") from None
    return Path(root) / config.sweep / run_id


def finished_run_message(run_dir: Path) -> str | None:
    """What to say when RUN_DIR already holds a finished run that did not end ``done``."""
    try:
        done = read_json(run_dir / DONE_FILE)
    except (FileNotFoundError, ValueError):
        return None
    if done.get("status") == "done":
        return None
    return (f"{run_dir} holds a finished run (status {done.get('status')}: {done.get('reason')}); nothing was run. "
            f"To start it fresh, remove the folder (rm -r {run_dir}) or train into another one with --out; "
            "a sweep's run restarts with `cmscale sweep relaunch SWEEP --failed`")


@click.command("train")
@click.argument("run_toml", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Run directory (default: ROOT/<sweep>/<run_id or the TOML's stem>).")
@ROOT_OPTION
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set budget_iters=50 --set ect.num_stages=2 (repeatable).")
@click.option("--force", is_flag=True,
              help="Resume even if settings that change the result differ from the run's config.json (recorded there).")
def train_command(run_toml: Path, out: Path | None, root: Path, overrides: tuple[str, ...], force: bool) -> None:
    """Train (or resume) one run described by RUN_TOML.

    The method (edm, ect, sct, scd), model preset, data, optimiser and budget (iterations or
    training FLOPs) come from the file. Started again on the same directory, the run resumes
    from its last checkpoint; a finished run prints its done.json. Relative teacher_ckpt paths
    are looked up in the working directory, then beside RUN_TOML.
    """
    from cmscale.accounting import BudgetError
    from cmscale.checkpoint import CheckpointWriteError
    from cmscale.data.datasets import DatasetNotFoundError
    from cmscale.methods import TeacherCheckpointError
    from cmscale.progress import TensorBoardMissingError
    from cmscale.resume import ResumeConfigError
    from cmscale.train import train

    try:
        config = load_run_config(run_toml, parse_overrides(overrides))
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    if config.teacher_ckpt:  # a relative path: from the working directory, else beside RUN_TOML
        config = config.model_copy(update={"teacher_ckpt": resolve_path(config.teacher_ckpt, run_toml.parent)})
    run_dir = out if out is not None else default_run_dir(config, run_toml, root)
    finished = finished_run_message(run_dir)
    if finished:
        raise click.ClickException(finished)
    click.echo(f"{config.method} {config.preset} on {config.dataset} -> {run_dir}", err=True)
    try:
        done = train(config, run_dir, force=force)
    except TeacherCheckpointError as error:
        raise click.ClickException(f"{run_toml}: teacher_ckpt: {error}") from None
    except BudgetError as error:
        raise click.ClickException(f"{run_toml}: {error}") from None
    except DatasetNotFoundError as error:
        raise click.ClickException(f"{run_toml}: data_path: {error}") from None
    except ResumeConfigError as error:
        raise click.ClickException(str(error)) from None
    except TensorBoardMissingError as error:
        raise click.ClickException(f"{run_toml}: {error}") from None
    except CheckpointWriteError as error:
        try:  # no longer running; no done.json either, so the same command resumes once there is space
            write_status(run_dir, RunState.FAILED, reason=str(error))
        except OSError:
            pass
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(done, indent=2, default=str))
    if done.get("status") == "interrupted":
        signal_name = str(done.get("reason", "")).removeprefix("signal ")
        click.echo(f"interrupted by {signal_name} at step {done.get('final_step')}; the checkpoint is saved: run the "
                   "same command again to resume", err=True)
        raise SystemExit(128 + signal.Signals[signal_name].value if signal_name in signal.Signals.__members__ else 1)
    if done.get("status") == "failed":
        raise click.ClickException(f"run failed: {done.get('reason')}")
