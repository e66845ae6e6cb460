"""``cmscale data info``: a dataset's size, resolution, channels and classes."""

from __future__ import annotations

import json

import click
from rich.table import Table

from cmscale.cli.options import JSON_OPTION, print_table


@click.group("data")
def data_group() -> None:
    """Datasets: the embedded digits set, CIFAR-10 and image folders from disk."""


@data_group.command("info")
@click.argument("name", type=click.Choice(["digits", "cifar10", "imagefolder"]))
@click.option(
    "--path", type=click.Path(path_type=str), default=None, help="Dataset folder or zip (not needed for digits)."
)
@click.option("--resolution", type=click.IntRange(min=4), default=None, help="Resize to this resolution.")
@JSON_OPTION
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
    print_table(table)
