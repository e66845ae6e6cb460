"""The ``cmscale`` command. Each area keeps its subcommands in its own module; this file wires them."""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cmscale")
def main() -> None:
    """cmscale: scaling-law studies of consistency models (ECT, sCT, sCD)."""


@main.group()
def models() -> None:
    """Model presets: sizes and counted FLOPs."""


@models.command("list")
@click.option("--resolution", default=16, show_default=True, type=click.IntRange(min=4), help="Image resolution.")
@click.option("--channels", default=1, show_default=True, type=click.IntRange(min=1), help="Image channels.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(resolution: int, channels: int, as_json: bool) -> None:
    """List the UNet presets with parameter counts and forward FLOPs per image."""
    from cmscale.models.flops import FLOP_CONVENTION, forward_flops, meta_copy
    from cmscale.models.presets import PRESETS, build_unet
    from cmscale.models.unet import count_parameters

    rows = []
    for name, preset in PRESETS.items():
        try:
            net = meta_copy(lambda name=name: build_unet(name, resolution, channels))
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--resolution") from None
        rows.append(
            {
                "name": name,
                "params": count_parameters(net),
                "flops_per_image_forward": forward_flops(net),
                "model_channels": preset.model_channels,
                "channel_mult": list(preset.channel_mult),
                "num_blocks": preset.num_blocks,
                "attn_resolutions": list(preset.attn_resolutions(resolution)),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"UNet presets at {resolution}x{resolution}x{channels}", caption=f"FLOPs: {FLOP_CONVENTION}")
    for column in ("preset", "params", "fwd FLOPs/image", "channels", "mult", "blocks", "attention at"):
        table.add_column(column, justify="right" if column not in ("preset",) else "left")
    for row in rows:
        table.add_row(
            row["name"],
            f"{row['params']:,}",
            f"{row['flops_per_image_forward']:.3g}",
            str(row["model_channels"]),
            str(tuple(row["channel_mult"])),
            str(row["num_blocks"]),
            str(tuple(row["attn_resolutions"])) if row["attn_resolutions"] else "-",
        )
    console.print(table)


@main.group()
def data() -> None:
    """Datasets: the embedded digits set, CIFAR-10 and image folders from disk."""


@data.command("info")
@click.argument("name", type=click.Choice(["digits", "cifar10", "imagefolder"]))
@click.option("--path", type=click.Path(path_type=str), default=None, help="Dataset folder or zip (not needed for digits).")
@click.option("--resolution", type=click.IntRange(min=4), default=None, help="Resize to this resolution.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def data_info(name: str, path: str | None, resolution: int | None, as_json: bool) -> None:
    """Show a dataset's size, resolution, channels and classes."""
    from cmscale.data import DatasetNotFoundError, load_dataset

    try:
        dataset = load_dataset(name, path=path, resolution=resolution)
    except (DatasetNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    info = dataset.info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"dataset {name}")
    table.add_column("field")
    table.add_column("value")
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)


@main.command("demo")
@click.option("--out", "out", type=click.Path(path_type=str), default=lambda: os.environ.get("CMSCALE_RESULTS", "results"),
              show_default="results (or $CMSCALE_RESULTS)",
              help="Results root of the demo; its DuckDB store and report live there.")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: processes on this machine; slurm: the cluster behind SLURM_CONF.")
@click.option("--profile", default=None, help="SLURM profile (slurm/profiles/NAME.toml) for --executor slurm.")
@click.option("--quick", is_flag=True, help="Two sizes, three budgets, shorter teachers: under 3 minutes on 2 cores.")
def demo_command(out: str, executor: str, profile: str | None, quick: bool) -> None:
    """Run the whole study on the embedded digits data: teachers, ECT and sCD, FID/KID, DuckDB, fits, report."""
    from pathlib import Path

    from cmscale.config import ConfigError
    from cmscale.demo import run_demo

    try:
        run_demo(Path(out), executor=executor, quick=quick, profile=profile, console=console)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


def _register() -> None:
    """Attach the subcommand groups that live beside their code."""
    from cmscale.sweep.cli import sweep_group

    main.add_command(sweep_group)
    from cmscale.results.cli import results_group

    main.add_command(results_group)
    from cmscale.analysis.cli import register as register_analysis

    register_analysis(main)
    from cmscale.sweep.tune_cli import tune_group

    main.add_command(tune_group)
    from cmscale.train_cli import train_command

    main.add_command(train_command)
    from cmscale.eval.cli import eval_command

    main.add_command(eval_command)


_register()

if __name__ == "__main__":
    sys.exit(main())
