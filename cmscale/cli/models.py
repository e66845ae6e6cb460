"""``cmscale models list``: the network presets with parameter counts and counted FLOPs."""

from __future__ import annotations

import json

import click
from rich.table import Table

from cmscale.cli.options import console, json_option

COLUMNS = ("preset", "params", "fwd FLOPs/image", "channels", "mult", "blocks", "attention at", "labels")


@click.group("models")
def models_group() -> None:
    """Model presets: sizes and counted FLOPs."""


@models_group.command("list")
@click.option("--resolution", default=16, show_default=True, type=click.IntRange(min=4), help="Image resolution.")
@click.option("--channels", default=1, show_default=True, type=click.IntRange(min=1), help="Image channels.")
@click.option("--label-dim", type=click.IntRange(min=0), default=None,
              help="Class count for the presets that take labels (edm2, ddpmpp, adm); default: each preset's "
                   "own (1000 for EDM2's ImageNet presets, else 0).")
@json_option("Print JSON instead of a table.")
def models_list(resolution: int, channels: int, label_dim: int | None, as_json: bool) -> None:
    """List the presets with parameter counts and forward FLOPs per image (whole numbers).

    A terminal gets a table; a pipe or file gets plain comma-separated lines.
    """
    from cmscale.models.flops import FLOP_CONVENTION, forward_flops, meta_copy
    from cmscale.models.presets import PRESETS, build_unet
    from cmscale.models.unet import count_parameters

    rows = []
    for name, preset in PRESETS.items():
        # every family but cmscale's own unet takes class labels
        labels = (preset.label_dim if label_dim is None else label_dim) if preset.architecture != "unet" else 0
        try:
            net = meta_copy(lambda name=name, labels=labels: build_unet(name, resolution, channels, label_dim=labels))
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--resolution") from None
        rows.append(
            {
                "name": name,
                "architecture": preset.architecture,
                "params": count_parameters(net),
                "flops_per_image_forward": forward_flops(net),
                "model_channels": preset.model_channels,
                "channel_mult": list(preset.channel_mult),
                "num_blocks": preset.num_blocks,
                "attn_resolutions": list(preset.attn_resolutions(resolution)),
                "label_dim": labels,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cells = [
        (
            row["name"],
            f"{row['params']:,}",
            f"{row['flops_per_image_forward']:,}",
            str(row["model_channels"]),
            "x".join(str(mult) for mult in row["channel_mult"]),
            str(row["num_blocks"]),
            " ".join(str(res) for res in row["attn_resolutions"]) or "-",
            str(row["label_dim"]),
        )
        for row in rows
    ]
    title = f"presets at {resolution}x{resolution}x{channels}; FLOPs: {FLOP_CONVENTION}"
    if not console.is_terminal:  # whole numbers whatever the width: one comma-separated line per preset
        click.echo(f"# {title}")
        click.echo(",".join(COLUMNS))
        for cell in cells:
            click.echo(",".join(f'"{value}"' if "," in value else value for value in cell))
        return
    # The terminal table: the counts keep their full width and the layout shares one column that a
    # narrow terminal folds (80 columns hold it); the plain output above keeps one field per column.
    table = Table(title=title)
    table.add_column("preset", overflow="fold")
    for index, column in ((1, "params"), (2, "fwd FLOPs/image")):
        table.add_column(column, justify="right", min_width=max(len(cell[index]) for cell in cells), no_wrap=True)
    table.add_column("layout: channels, mult, blocks, attention at", overflow="fold")
    table.add_column("labels", justify="right", overflow="fold")
    for name, params, flops, channels, mult, blocks, attention, labels in cells:
        table.add_row(name, params, flops, f"{channels}, {mult}, {blocks}, {attention}", labels)
    console.print(table)
