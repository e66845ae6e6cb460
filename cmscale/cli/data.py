"""``cmscale data info`` (a dataset's size, resolution, channels and classes) and ``cmscale data encode``."""

from __future__ import annotations

import json

import click
from rich.table import Table

from cmscale.cli.options import JSON_OPTION, console, print_table


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


@data_group.command("encode")
@click.argument("images", type=click.Path(path_type=str))
@click.option("--out", "out", type=click.Path(path_type=str), required=True,
              help="The latent zip to write (EDM2's format); parts go to OUT.parts/ until merged.")
@click.option("--vae", "vae", type=click.Path(path_type=str), default=None,
              help="Local diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse); not needed with --merge.")
@click.option("--shard", default=None, metavar="I/N",
              help="Encode only this task's parts (part c belongs to shard c %% N), e.g. "
                   "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT; merge with --merge once all shards are done.")
@click.option("--merge", is_flag=True, help="Only merge the finished parts into OUT (fails naming missing parts).")
@click.option("--chunk", type=click.IntRange(min=1), default=1000, show_default=True, help="Images per part.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="VAE batch size.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto.")
def data_encode(images: str, out: str, vae: str | None, shard: str | None, merge: bool, chunk: int,
                batch_size: int, device: str) -> None:
    """Encode IMAGES (an EDM-format folder or zip) to VAE latents: mean and std per image, labels kept.

    Resumable: finished parts are skipped when a task runs again. Without --shard the whole set is
    encoded and merged in one go.
    """
    from cmscale.data import DataFormatError, DatasetNotFoundError
    from cmscale.data.encode import encode_parts, merge_parts, parse_shard
    from cmscale.data.vae import VAECodec, VAEError
    from cmscale.distributed import pick_device

    try:
        if not merge:
            if vae is None:
                raise click.UsageError("--vae PATH is required to encode (a local AutoencoderKL folder)")
            part = parse_shard(shard) if shard else (0, 1)
            codec = VAECodec(vae, pick_device(device), batch_size=batch_size)
            written = encode_parts(images, codec, out, part, chunk, log=lambda line: console.print(line))
            console.print(f"shard {part[0]}/{part[1]}: {len(written)} parts written")
        if merge or shard is None:
            console.print(f"wrote {merge_parts(images, out, chunk)}")
        else:
            console.print(f"when every shard is done: cmscale data encode {images} --out {out} --merge")
    except (DatasetNotFoundError, DataFormatError, VAEError, ValueError) as error:
        raise click.ClickException(str(error)) from None
