"""``cmscale eval RUN_DIR``: FID of a finished run's final checkpoint, appended to its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from cmscale.cli.options import ROOT_OPTION, console, json_option, print_table


def _parse_steps(ctx, param, value: str | None) -> list[int] | None:  # noqa: ARG001
    if value is None:
        return None
    try:
        steps = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 1,2") from None
    if not steps or any(step < 1 for step in steps):
        raise click.BadParameter(f"{value!r}: give positive integers, e.g. 1,2")
    return steps


@click.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--steps",
    callback=_parse_steps,
    default=None,
    help="Sampler step counts, comma-separated (default: the run's eval.cm_steps, or edm.heun_steps for a teacher).",
)
@click.option(
    "--num-samples",
    type=click.IntRange(min=2),
    default=None,
    help="Generated images per FID (default: the run's eval.num_samples; 50,000 real data, 1,000 digits).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Sampling and feature batch size.")
@click.option(
    "--inception-weights",
    type=click.Path(path_type=Path),
    default=None,
    help="Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth, torch-fidelity's release), for offline "
         "nodes.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 or auto.")
@click.option("--shard", default=None, metavar="I/N|auto",
              help="Draw only this task's chunks of samples and write their features under RUN_DIR/eval-shards "
                   "(resumable); 'auto' reads SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE. Then --reduce.")
@click.option("--reduce", is_flag=True, help="Score the features of every shard and append the eval rows.")
@click.option("--ema-sigma-rel", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Evaluate the post-hoc EMA of this width (RUN_DIR/phema/ema-<width>.pt, written by "
                   "`cmscale ema reconstruct`); rows are kind 'eval-ema' with ema_sigma_rel.")
@json_option("Print the rows as JSON.")
@ROOT_OPTION
def eval_command(run_dir: Path, steps, num_samples, batch_size, inception_weights, device, shard, reduce,
                 ema_sigma_rel, as_json, root: Path) -> None:
    """Evaluate RUN_DIR's ckpt/final.pt (EMA weights) and append eval rows to its metrics.jsonl.

    RUN_DIR is a run directory, or a path relative to --root such as SWEEP/RUN_ID. For 50,000
    samples across an array job: `cmscale eval RUN_DIR --shard auto` in every task, then
    `cmscale eval RUN_DIR --reduce` once.
    """
    from cmscale.data import DatasetNotFoundError
    from cmscale.eval.features import InceptionWeightsNotFoundError
    from cmscale.eval.run import RunDirError, evaluate_run_dir

    if not run_dir.is_absolute() and ".." in run_dir.parts:
        # Rows are appended to the run's metrics.jsonl: a relative path may not climb out of the root.
        raise click.ClickException(f"RUN_DIR {run_dir} climbs out with '..'; give SWEEP/RUN_ID under --root "
                                   f"({root}) or the run folder's absolute path")
    if not run_dir.is_dir() and (root / run_dir).is_dir():
        run_dir = root / run_dir
    if not run_dir.is_dir():
        raise click.ClickException(f"run directory {run_dir} not found (nor {root / run_dir})")
    shard_index = None
    if shard is not None:
        from cmscale.data.encode import parse_shard
        from cmscale.eval.shards import shard_from_environment

        try:
            shard_index = shard_from_environment() if shard == "auto" else parse_shard(shard)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--shard") from None
    try:
        with console.status(f"evaluating {run_dir}"):
            rows = evaluate_run_dir(
                run_dir,
                steps=steps,
                num_samples=num_samples,
                inception_weights=inception_weights,
                batch_size=batch_size,
                device=device,
                shard=shard_index,
                reduce=reduce,
                ema_sigma_rel=ema_sigma_rel,
            )
    except (InceptionWeightsNotFoundError, DatasetNotFoundError, RunDirError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row["kind"] == "eval-shard":
            console.print(f"shard {row['shard'][0]}/{row['shard'][1]}, {row['sampler_steps']} steps: "
                          f"{len(row['chunks_written'])} chunks written, {row['chunks_missing']} still missing "
                          f"({row['folder']})")
    rows = [row for row in rows if row["kind"] in ("eval", "eval-ema")]
    if not rows:
        return
    table = Table(title=f"eval of {run_dir} (appended to metrics.jsonl)")
    for column in (
        "step",
        "sampler steps",
        "NFE",
        "FID",
        "samples",
        "sampling FLOPs/image",
        "extractor",
        "reference",
        "s",
    ):
        table.add_column(column, justify="left" if column in ("extractor", "reference") else "right")
    for row in rows:
        table.add_row(
            str(row["step"]),
            str(row["sampler_steps"]),
            str(row["nfe"]),
            f"{row['fid']:.4g}",
            str(row["num_samples"]),
            f"{row['sampling_flops_per_image']:.3g}",
            row["extractor"],
            row["reference"],
            f"{row['wall_s']:.1f}",
        )
    print_table(table)
