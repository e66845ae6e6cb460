"""``cmscale demo``: the whole study on the embedded digits data (see :mod:`cmscale.demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from cmscale.cli.options import clear_errors, console
from cmscale.cluster.executors import EXECUTORS
from cmscale.config import DEFAULT_RESULTS_ROOT, RESULTS_ENV, ConfigError, default_results_root


@click.command("demo")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=str),
    default=lambda: str(default_results_root()),
    show_default=f"{DEFAULT_RESULTS_ROOT} (or ${RESULTS_ENV})",
    help="Results root of the demo; its DuckDB store and report live there.",
)
@click.option(
    "--executor",
    type=click.Choice([kind for kind in EXECUTORS if kind != "debug"]),
    default="local",
    show_default=True,
    help="local: processes on this machine; slurm: the cluster behind SLURM_CONF.",
)
@click.option("--profile", default=None, help="SLURM profile (slurm/profiles/NAME.toml) for --executor slurm.")
@click.option("--quick", is_flag=True,
              help="Two sizes, three smaller budgets, shorter teachers: under 3 minutes on 2 cores.")
def demo_command(out: str, executor: str, profile: str | None, quick: bool) -> None:
    """Run the whole study on the embedded digits data: teachers, ECT and sCD, FID/KID, DuckDB, fits, report."""
    from cmscale.demo import run_demo

    with clear_errors(ConfigError):
        run_demo(Path(out), executor=executor, quick=quick, profile=profile, console=console)
