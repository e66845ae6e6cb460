"""``cmscale train RUN.toml``: one training run from a TOML file (see :class:`cmscale.config.RunConfig`)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from cmscale.config import (
    ConfigError,
    RunConfig,
    format_validation_error,
    read_toml,
    safe_path_component,
)
from cmscale.rundir import DONE_FILE, read_json
from cmscale.sweep.cli import ROOT_OPTION


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` -> (["a", "b"], value); VALUE is read as a TOML value, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r} is not KEY=VALUE (e.g. budget_iters=50 or ect.num_stages=2)", param_hint="--set")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_with_overrides(path: Path, overrides: tuple[str, ...]) -> RunConfig:
    """Read RUN_TOML, apply ``--set`` overrides, validate once; errors name the file and the field."""
    raw = read_toml(path, "run config")
    for override in overrides:
        keys, value = parse_override(override)
        section = raw
        for key in keys[:-1]:
            section = section.setdefault(key, {})
        section[keys[-1]] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        source = f"{path} (with --set {' '.join(overrides)})" if overrides else str(path)
        raise ConfigError(format_validation_error(source, error)) from None


def resolve_teacher_path(config: RunConfig, toml_path: Path) -> RunConfig:
    """A relative ``teacher_ckpt`` is looked up in the working directory, then beside the TOML file."""
    if not config.teacher_ckpt or Path(config.teacher_ckpt).is_absolute() or Path(config.teacher_ckpt).is_file():
        return config
    beside = (toml_path.parent / config.teacher_ckpt).resolve()
    if beside.is_file():
        return config.model_copy(update={"teacher_ckpt": str(beside)})
    return config


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
    from cmscale.data.datasets import DatasetNotFoundError
    from cmscale.methods import BudgetError, TeacherCheckpointError
    from cmscale.train import ResumeConfigError, train

    try:
        config = load_with_overrides(run_toml, overrides)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    config = resolve_teacher_path(config, run_toml)
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
    click.echo(json.dumps(done, indent=2, default=str))
    if done.get("status") == "failed":
        raise click.ClickException(f"run failed: {done.get('reason')}")
