"""``cmscale ema reconstruct``: post-hoc EMA (EDM2) of a run's stored power-EMA snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cmscale.cli.options import json_option


def _parse_sigma_rels(ctx, param, value: str) -> list[float]:  # noqa: ARG001
    from cmscale.models.ema import MAX_SIGMA_REL

    try:
        widths = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers (e.g. 0.03,0.05,0.1)") from None
    bad = [width for width in widths if not 0 < width < MAX_SIGMA_REL]
    if not widths or bad:
        raise click.BadParameter(f"each width must be in (0, {MAX_SIGMA_REL:.4f}); got {value!r}")
    return widths


@click.group("ema")
def ema_group() -> None:
    """Post-hoc EMA: any EMA width after training, from stored snapshots (EDM2)."""


@ema_group.command("reconstruct")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sigma-rel", "sigma_rels", required=True, callback=_parse_sigma_rels,
              help="Comma-separated EMA widths relative to the run's length, e.g. 0.03,0.05,0.1,0.15.")
@click.option("--step", type=click.IntRange(min=1), default=None,
              help="Reconstruct the EMAs at this stored step (default: the last snapshot's).")
@json_option("Print the written checkpoints as JSON.")
def reconstruct_command(run_dir: Path, sigma_rels: list[float], step: int | None, as_json: bool) -> None:
    """Solve EDM2's least-squares problem over RUN_DIR/phema/ and write one checkpoint per width.

    The run must have stored snapshots (config: ema_sigma_rels = [0.05, 0.1] and phema_every = N).
    Each output, RUN_DIR/phema/ema-<width>.pt, is a checkpoint like ckpt/final.pt plus ema_sigma_rel.
    """
    import torch

    from cmscale.models.phema import list_snapshots, reconstruct, reconstruction_path
    from cmscale.rundir import final_checkpoint

    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise click.ClickException(f"{run_dir}/phema: no post-hoc EMA snapshots; train with ema_sigma_rels = "
                                   "[0.05, 0.1] and phema_every = N (steps) to store them")
    final = final_checkpoint(run_dir)
    if not final.is_file():
        raise click.ClickException(f"{final} not found: the run has not finished; reconstruct after it has "
                                   "(its metadata describes the network)")
    meta = {key: value for key, value in torch.load(final, map_location="cpu", weights_only=True).items()
            if key != "net"}
    try:
        at_step, states = reconstruct(snapshots, sigma_rels, step)
    except ValueError as error:
        raise click.ClickException(f"{run_dir}: {error}") from None
    written = []
    for sigma_rel, state in zip(sigma_rels, states):
        out = reconstruction_path(run_dir, sigma_rel)
        tmp = out.with_name(f".{out.name}.tmp")
        torch.save(meta | {"net": state, "step": at_step, "ema_sigma_rel": sigma_rel}, tmp)
        tmp.replace(out)
        written.append({"sigma_rel": sigma_rel, "step": at_step, "path": str(out)})
    if as_json:
        click.echo(json.dumps(written, indent=2))
        return
    used = sorted({snap.sigma_rel for snap in snapshots})
    click.echo(f"{len([s for s in snapshots if s.step <= at_step])} snapshots (widths {used}) up to step {at_step}:")
    for row in written:
        click.echo(f"  sigma_rel {row['sigma_rel']}: {row['path']}")
