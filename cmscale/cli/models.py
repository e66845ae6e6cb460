"""``cmscale models list``: the UNet presets with parameter counts and counted FLOPs."""

from __future__ import annotations

import json

import click
from rich.table import Table

from cmscale.cli.options import console, json_option


@click.group("models")
def models_group() -> None:
    """Model presets: sizes and counted FLOPs."""


@models_group.command("list")
@click.option("--resolution", default=16, show_default=True, type=click.IntRange(min=4), help="Image resolution.")
@click.option("--channels", default=1, show_default=True, type=click.IntRange(min=1), help="Image channels.")
@json_option("Print JSON instead of a table.")
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
