"""``cmscale teacher import``: a thin click layer over :mod:`cmscale.models.edm_import`."""

from __future__ import annotations

import json

import click

from cmscale.cli.options import json_option


@click.group("teacher")
def teacher_group() -> None:
    """Teacher checkpoints: import published EDM networks."""


@teacher_group.command("import")
@click.argument("edm_pickle", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Where to write the cmscale teacher checkpoint (.pt); use it as teacher_ckpt.",
)
@json_option("Print the checkpoint's metadata as JSON.")
def import_command(edm_pickle: str, out: str, as_json: bool) -> None:
    """Turn EDM's network pickle (e.g. edm-cifar10-32x32-uncond-vp.pkl) into a teacher checkpoint.

    The pickle is read without running any of its code: only tensors, arrays, containers and EDM's
    persistence records are accepted; anything else is refused.
    """
    from cmscale.models.edm_import import EDMPickleError, import_edm_pickle

    try:
        summary = import_edm_pickle(edm_pickle, out)
    except EDMPickleError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"wrote {out}: preset {summary['preset']} ({summary['params']:,} parameters, "
        f"{summary['source']['network']}), {summary['resolution']}x{summary['resolution']}x"
        f"{summary['img_channels']}, sigma_data {summary['sigma_data']}"
    )
    for note in summary["notes"]:
        click.echo(f"note: {note}")
    click.echo(f'use it with:  preset = "{summary["preset"]}"  teacher_ckpt = "{out}"')
