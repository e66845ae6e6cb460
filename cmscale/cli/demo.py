"""``cmscale demo``: the whole study on the embedded digits data (see :mod:`cmscale.demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from cmscale.cli.options import console, parse_overrides, set_option, spec_error
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
@set_option("--set 'presets=[\"xxs\",\"xs\"]' --set executor.max_parallel=1")
def demo_command(out: str, executor: str, profile: str | None, quick: bool, overrides: tuple[str, ...]) -> None:
    """Run the whole study on the embedded digits data: teachers, ECT and sCD, FID/KID, DuckDB, fits, report.

    Exits 1 naming them when runs did not finish (the report is still written from the others)."""
    from cmscale.demo import run_demo

    given = parse_overrides(overrides)
    try:
        result = run_demo(Path(out), executor=executor, quick=quick, profile=profile, console=console,
                          overrides=given)
    except ConfigError as error:
        raise spec_error(error, given, "the keys of cmscale/examples/demo_digits.toml, dotted: presets=[\"xxs\"], "
                                       "seeds=[0,1], defaults.batch_size=64, executor.max_parallel=1") from None
    if result["failed"]:
        for run in result["failed"]:
            console.print(f"  [red]{run['state']}[/red]  {run['run_id']}: {run['reason']}", highlight=False,
                          soft_wrap=True)
        console.print(f"[red]{len(result['failed'])} demo run(s) did not finish[/red]; "
                      f"see `cmscale sweep status {result['sweep']} --root {out}`")
        raise click.exceptions.Exit(1)
