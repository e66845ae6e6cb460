"""``cmscale teacher import``: a thin click layer over :mod:`cmscale.models.edm_import`."""

from __future__ import annotations

import json

import click

from cmscale.cli.options import json_option


@click.group("teacher")
def teacher_group() -> None:
    """Teacher checkpoints: import published EDM and EDM2 networks."""


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
    """Turn an EDM or EDM2 network pickle (edm-cifar10-32x32-uncond-vp.pkl, edm2-img64-s-1073741-0.075.pkl)
    into a teacher checkpoint; cmscale.teacher.load_denoiser(OUT) gives its denoiser.

    The pickle is read without running any of its code: only tensors, arrays, containers and the
    persistence records of EDM/EDM2 are accepted; anything else is refused. The architecture comes
    from the pickle's constructor arguments (any width, depth, resolution and label_dim).
    """
    from cmscale.models.edm_import import import_edm_pickle
    from cmscale.models.edm_pickle import EDMPickleError

    try:
        summary = import_edm_pickle(edm_pickle, out)
    except EDMPickleError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    labels = f", {summary['label_dim']} classes" if summary.get("label_dim") else ""
    encoder = f", encoder {summary['encoder']['class_name']}" if summary.get("encoder") else ""
    click.echo(
        f"wrote {out}: preset {summary['preset'] or '(none: architecture from the pickle)'} "
        f"({summary['params']:,} parameters, {summary['source']['network']}), {summary['resolution']}x"
        f"{summary['resolution']}x{summary['img_channels']}{labels}, sigma_data {summary['sigma_data']}{encoder}"
    )
    for note in summary["notes"]:
        click.echo(f"note: {note}")
    if summary["preset"]:
        click.echo(f'use it with:  preset = "{summary["preset"]}"  teacher_ckpt = "{out}"')
    click.echo(f'its denoiser: cmscale.teacher.load_denoiser("{out}")')
