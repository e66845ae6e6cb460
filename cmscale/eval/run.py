"""Evaluating a model: sample with the method's sampler, FID through torch-fidelity, eval rows.

``evaluate_model`` is what the trainer calls at ``config.eval.at_fractions`` of the budget (with
the EMA model) and what ``cmscale eval RUN_DIR`` calls on a finished run's ``ckpt/final.pt``.
It returns one row per sampler step count (1 and 2 for consistency models, the Heun step counts
for an EDM teacher), with the keys of the run-directory contract::

    kind="eval", step, train_flops, images_seen, sampler_steps, nfe, fid, kid, kid_std, num_samples,
    extractor, reference, sampling_flops_per_image, wall_s

``sampling_flops_per_image = nfe * forward_flops(unet)`` (counted FLOPs of one UNet forward on one
image, the convention of cmscale.models.flops), so FID can be plotted against sampling compute.
``wall_s`` is the seconds this row's sampling and FID took. ``kid``/``kid_std`` are KID's mean and
std over ``eval.kid_subsets`` subsets of ``min(1000, num_samples)`` images (None when
``kid_subsets`` is 0). FID from a few hundred samples is biased upwards by roughly 1/num_samples;
KID is unbiased, and ``num_samples`` travels with every row so the two can be read together.

Sampling is reproducible: every eval of a run draws its noise from one generator seeded with
``eval.seed`` (the same noise at every training step and for every step count), batched by
``eval.batch_size``, and the caller's RNG streams are left as they were.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmscale.accounting import train_flops_at
from cmscale.config import RunConfig
from cmscale.data import ArchiveDataset, load_dataset
from cmscale.distributed import pick_device
from cmscale.eval.features import DIGITS_CNN, INCEPTION, FeatureSpace, feature_space
from cmscale.eval.fid import (
    Scores,
    features_of,
    fid_to_stats,
    reference_statistics,
    scores_to_reference,
    to_uint8,
)
from cmscale.eval.reference import PublishedReference, ReferenceStatsError, is_stats_file, read_reference_stats
from cmscale.methods import network_of, sampler_steps, with_sampler_steps
from cmscale.models.flops import forward_flops
from cmscale.rundir import (
    METRICS_FILE,
    SAMPLES_DIR,
    MetricsWriter,
    atomic_write_bytes,
    final_checkpoint,
)
from cmscale.sampling import balanced_labels, guide_from_checkpoint, model_from_checkpoint, sample

DIGITS_DEFAULT_SAMPLES = 1_000
REAL_DATA_DEFAULT_SAMPLES = 50_000  # the FID-50k convention of published numbers
# Above this many bytes of uint8 samples an eval keeps only their features (FID without KID).
MAX_SAMPLE_BYTES = 4 * 2**30
EVAL_ROW_KEYS = ("kind", "step", "train_flops", "images_seen", "sampler_steps", "nfe", "fid", "kid", "kid_std",
                 "num_samples", "extractor", "reference", "sampling_flops_per_image", "wall_s")


def eval_num_samples(config: RunConfig) -> int:
    """``eval.num_samples``, or the dataset's default: 50,000 for real data, 1,000 for digits."""
    if config.eval.num_samples is not None:
        return config.eval.num_samples
    return DIGITS_DEFAULT_SAMPLES if config.dataset == "digits" else REAL_DATA_DEFAULT_SAMPLES


@torch.no_grad()
def generate(config: RunConfig, model: nn.Module, num_samples: int, steps: int, channels: int,
             device: torch.device, batch_size: int, seed: int, decode=to_uint8,
             guide: nn.Module | None = None) -> tuple[torch.Tensor, int]:
    """``num_samples`` uint8 images from the method's sampler at ``steps``; returns (images, nfe).
    ``decode`` turns the sampler's output into uint8 pixels (a VAE's decoder for latent runs).
    A class-conditional run samples class-balanced labels (:func:`cmscale.sampling.balanced_labels`),
    guided by ``config.guidance`` (with ``guide``, autoguidance)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks, nfe = [], 0
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        shape = (count, channels, config.resolution, config.resolution)
        labels = balanced_labels(start, count, config.label_dim, device)
        images, nfe = sample(config, model, shape, steps, generator, device, labels, guide)
        chunks.append(decode(images))
    return torch.cat(chunks), nfe


def conditioning_keys(config: RunConfig) -> dict[str, Any]:
    """Eval-row keys of a class-conditional or guided run: the guidance scale, its kind and the class balance."""
    if not config.label_dim and config.guidance == 1:
        return {}
    kind = "none" if config.guidance == 1 else "autoguidance" if config.guide_ckpt else "classifier-free"
    return {"guidance": float(config.guidance), "guidance_kind": kind,
            "class_balance": "balanced" if config.label_dim else None}


def sample_decoder(config: RunConfig, device: torch.device):
    """Sampler output -> uint8 pixels: the VAE's decoder in a latent run, else a rescale."""
    if config.vae_path is None:
        return to_uint8
    from cmscale.data.vae import VAECodec

    return VAECodec(config.vae_path, device).decode


def pixel_resolution(config: RunConfig) -> int:
    if config.vae_path is None:
        return config.resolution
    from cmscale.data.vae import vae_downsampling

    return config.resolution * vae_downsampling(config.vae_path)


def load_reference(config: RunConfig, space, device: torch.device, batch_size: int):
    """FID's reference: published statistics (``fid_reference`` a .pkl/.npz), another image set
    (``fid_reference`` a folder or zip) or the training images. Checked against the samples'
    resolution and the feature space before anything is sampled."""
    resolution = pixel_resolution(config)
    if config.fid_reference is not None and is_stats_file(config.fid_reference):
        return read_reference_stats(config.fid_reference, space, resolution)
    if config.fid_reference is not None:
        data = load_dataset("imagefolder", path=config.fid_reference)
        if data.resolution != resolution:
            raise ReferenceStatsError(
                f"fid_reference {config.fid_reference} holds {data.resolution}x{data.resolution} images but this "
                f"run's samples are {resolution}x{resolution}; give the image set at the samples' resolution")
    else:
        data = load_dataset(config.dataset, path=config.data_path, resolution=config.resolution)
    reference, _ = reference_statistics(data, space, device, batch_size)
    return reference


def check_reference(config: RunConfig) -> None:
    """Before training: ``fid_reference`` (and a latent run's VAE) fit the samples this run will
    score, so a wrong file fails now, naming it, rather than at the first eval hours later."""
    if config.fid_reference is None or not config.eval.at_fractions:
        return
    resolution = pixel_resolution(config)
    if is_stats_file(config.fid_reference):
        name = DIGITS_CNN if config.eval.extractor == "auto" and config.dataset == "digits" else config.eval.extractor
        layer = "features" if name == DIGITS_CNN else "2048"
        extractor = INCEPTION if name == "auto" else name
        read_reference_stats(config.fid_reference, FeatureSpace(extractor, "check", Path(), layer, 3), resolution)
        return
    images = ArchiveDataset(config.fid_reference)
    if images.kind != "pixels" or images.resolution != resolution:
        raise ReferenceStatsError(
            f"fid_reference {config.fid_reference} holds {images.kind} of "
            f"{'x'.join(map(str, images.item_shape))}, but this run's samples are {resolution}x{resolution} "
            "images; give the image set at the samples' resolution (or its published statistics)")


def score(images: torch.Tensor, reference, device: torch.device, batch_size: int, kid_subsets: int) -> Scores:
    """FID (and KID against a local image set) of uint8 ``images``."""
    if isinstance(reference, PublishedReference):
        return Scores(fid_to_stats(features_of(images, reference.space, device, batch_size), reference.stats()))
    return scores_to_reference(images, reference, device, batch_size, kid_subsets)


def save_grid(images: torch.Tensor, path: Path, max_images: int = 64) -> Path | None:
    """A square-ish PNG grid of the first ``max_images`` uint8 images, written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    count = min(max_images, images.shape[0])
    if count == 0:
        return None
    grid = make_grid(images[:count], nrow=math.ceil(math.sqrt(count)), padding=1, pad_value=0)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def evaluate_model(config: RunConfig, model: nn.Module, step: int, train_flops: float, images_seen: int,
                   run_dir: Path | str, device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """FID of ``model`` (the EMA network) at each sampler step count; saves a grid per eval.

    Raises InceptionWeightsNotFoundError before reading any data when real-data FID needs
    Inception weights that are not on disk.
    """
    device = torch.device(device)
    run_dir = Path(run_dir)
    space = feature_space(config.dataset, config.eval.extractor, config.eval.inception_weights)
    batch_size = config.eval.batch_size
    reference = load_reference(config, space, device, batch_size)
    decode = sample_decoder(config, device)
    net = network_of(model)
    flops_forward = forward_flops(net)
    num_samples = eval_num_samples(config)
    resolution = pixel_resolution(config)
    held_in_memory = num_samples * 3 * resolution**2 <= MAX_SAMPLE_BYTES
    guide = guide_from_checkpoint(config, net.img_channels, device)
    rows = []
    was_training = model.training
    model.eval()
    try:
        # Sampling and feature extraction draw no numbers from the training streams.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for steps in sampler_steps(config):
                started = time.time()
                if held_in_memory:
                    images, nfe = generate(config, model, num_samples, steps, net.img_channels, device, batch_size,
                                           config.eval.seed, decode, guide)
                    scores = score(images, reference, device, batch_size, config.eval.kid_subsets)
                else:
                    images, scores, nfe = _streamed_fid(config, model, num_samples, steps, net.img_channels, device,
                                                        decode, reference, space, guide)
                if config.eval.grid_images:
                    save_grid(
                        images, run_dir / SAMPLES_DIR / f"step{step:08d}-{steps}steps.png", config.eval.grid_images
                    )
                rows.append(
                    {
                        "kind": "eval",
                        "step": int(step),
                        "train_flops": float(train_flops),
                        "images_seen": int(images_seen),
                        "sampler_steps": int(steps),
                        "nfe": int(nfe),
                        "fid": scores.fid,
                        "kid": scores.kid,
                        "kid_std": scores.kid_std,
                        "num_samples": int(num_samples),
                        "extractor": space.extractor,
                        "reference": reference.id,
                        "sampling_flops_per_image": float(nfe * flops_forward),
                        "wall_s": time.time() - started,
                        **conditioning_keys(config),
                    }
                )
    finally:
        model.train(was_training)
    return rows


@torch.no_grad()
def _streamed_fid(config: RunConfig, model: nn.Module, num_samples: int, steps: int, channels: int,
                  device: torch.device, decode, reference, space,
                  guide: nn.Module | None = None) -> tuple[torch.Tensor, Scores, int]:
    """FID of the samples ``generate`` would draw, keeping only their features (and the grid's
    images): 50,000 decoded 512x512 samples would take 39 GB. FID only; KID needs the image sets."""
    generator = torch.Generator(device=device).manual_seed(config.eval.seed)
    features, grid, nfe = [], None, 0
    for start in range(0, num_samples, config.eval.batch_size):
        count = min(config.eval.batch_size, num_samples - start)
        labels = balanced_labels(start, count, config.label_dim, device)
        samples, nfe = sample(config, model, (count, channels, config.resolution, config.resolution), steps,
                              generator, device, labels, guide)
        pixels = decode(samples)
        grid = pixels[: config.eval.grid_images] if grid is None else grid
        features.append(features_of(pixels, space, device, config.eval.batch_size))
    if isinstance(reference, PublishedReference):
        stats = reference.stats()
    else:
        _, stats = reference_statistics(reference.data, reference.space, device)
    return grid, Scores(fid_to_stats(torch.cat(features), stats)), nfe


# ----------------------------------------------------------------------------------------------
# A finished run's final checkpoint (``cmscale eval RUN_DIR``)


class RunDirError(FileNotFoundError):
    """A run directory lacks what evaluation needs; the message names the file and the fix."""


def load_run_config_json(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The RunConfig in ``run_dir/config.json`` and the resolved extras the trainer added."""
    from pydantic import ValidationError

    from cmscale.config import format_validation_error
    from cmscale.rundir import CONFIG_FILE, read_json

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{path} not found: {run_dir} is not a run directory (the trainer writes config.json first)")
    raw = read_json(path)
    fields = {key: value for key, value in raw.items() if key in RunConfig.model_fields}
    extras = {key: value for key, value in raw.items() if key not in RunConfig.model_fields}
    try:
        return RunConfig.model_validate(fields), extras
    except ValidationError as error:
        raise RunDirError(format_validation_error(str(path), error)) from None


def model_from_final_checkpoint(
    config: RunConfig, path: Path, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """The EMA network of ``ckpt/final.pt`` in the method's wrapper (as build_method makes it)."""
    if not path.is_file():
        raise RunDirError(f"{path} not found: the run has not finished; train it to the end (or resume it) first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return model_from_checkpoint(config, payload, device), payload


def evaluate_run_dir(run_dir: Path | str, steps: list[int] | None = None, num_samples: int | None = None,
                     inception_weights: str | None = None, batch_size: int | None = None,
                     device: str = "auto", shard: tuple[int, int] | None = None,
                     reduce: bool = False, ema_sigma_rel: float | None = None) -> list[dict[str, Any]]:
    """Evaluate ``run_dir/ckpt/final.pt`` and append the rows to its ``metrics.jsonl``.

    ``ema_sigma_rel``: evaluate the post-hoc EMA of that width instead (``phema/ema-<width>.pt``, from
    ``cmscale ema reconstruct``); its rows are ``kind = "eval-ema"`` with ``ema_sigma_rel``, beside (not
    replacing) the run's own evals.

    With ``shard=(i, n)`` only this task's chunks of samples are drawn and their features written
    under ``eval-shards/`` (rows: what was written); ``reduce`` then scores all chunks and appends
    the eval rows (see :mod:`cmscale.eval.shards`)."""
    run_dir = Path(run_dir)
    config, extras = load_run_config_json(run_dir)
    eval_update: dict[str, Any] = {}
    if num_samples is not None:
        eval_update["num_samples"] = num_samples
    if batch_size is not None:
        eval_update["batch_size"] = batch_size
    if inception_weights is not None:
        eval_update["inception_weights"] = str(inception_weights)
    config = config.model_copy(update={"eval": config.eval.model_copy(update=eval_update)})
    if steps is not None:
        config = with_sampler_steps(config, steps)
    torch_device = pick_device(device)
    # Resolve the feature space first: a missing Inception file fails before the checkpoint loads.
    space = feature_space(config.dataset, config.eval.extractor, config.eval.inception_weights)
    if shard is not None or reduce:
        if ema_sigma_rel is not None:
            raise RunDirError("--ema-sigma-rel evaluates in one process; leave out --shard/--reduce")
        return _sharded_eval(config, run_dir, space, torch_device, shard, reduce)
    checkpoint = final_checkpoint(run_dir)
    if ema_sigma_rel is not None:
        from cmscale.models.phema import reconstruction_path

        checkpoint = reconstruction_path(run_dir, ema_sigma_rel)
        if not checkpoint.is_file():
            raise RunDirError(f"{checkpoint} not found: reconstruct that width first "
                              f"(cmscale ema reconstruct {run_dir} --sigma-rel {ema_sigma_rel})")
    model, payload = model_from_final_checkpoint(config, checkpoint, torch_device)
    step = int(payload["step"])
    # the trainer's own count (ECT's step cost depends on its stage, so not step x the average)
    rows = evaluate_model(config, model, step=step, train_flops=train_flops_at(config, step),
                          images_seen=step * config.batch_size, run_dir=run_dir, device=torch_device)
    if ema_sigma_rel is not None:
        rows = [row | {"kind": "eval-ema", "ema_sigma_rel": ema_sigma_rel} for row in rows]
    with MetricsWriter(run_dir / METRICS_FILE) as writer:
        for row in rows:
            writer.write(row)
    return rows


def _sharded_eval(config: RunConfig, run_dir: Path, space, device: torch.device, shard: tuple[int, int] | None,
                  reduce: bool) -> list[dict[str, Any]]:
    from cmscale.eval.shards import reduce_shards, shard_plan, write_shard

    reference = load_reference(config, space, device, config.eval.batch_size)  # checked before sampling
    model, payload = model_from_final_checkpoint(config, final_checkpoint(run_dir), device)
    step, num_samples = int(payload["step"]), eval_num_samples(config)
    net = network_of(model)
    rows = []
    if shard is not None:
        decode = sample_decoder(config, device)
        guide = guide_from_checkpoint(config, net.img_channels, device)
        for steps in sampler_steps(config):
            plan = shard_plan(run_dir, config, step, steps, num_samples)
            written = write_shard(config, model, plan, shard, space, decode, device, net.img_channels, guide)
            rows.append({"kind": "eval-shard", "step": step, "sampler_steps": steps, "shard": list(shard),
                         "chunks_written": written, "chunks_missing": len(plan.missing()), "folder": str(plan.folder)})
    if reduce:
        flops_forward = forward_flops(net)
        for steps in sampler_steps(config):
            started = time.time()
            scores, nfe = reduce_shards(shard_plan(run_dir, config, step, steps, num_samples), reference, device,
                                        config.eval.kid_subsets)
            rows.append({"kind": "eval", "step": step, "train_flops": float(train_flops_at(config, step)),
                         "images_seen": step * config.batch_size, "sampler_steps": int(steps), "nfe": int(nfe),
                         "fid": scores.fid, "kid": scores.kid, "kid_std": scores.kid_std,
                         "num_samples": int(num_samples),
                         "extractor": space.extractor, "reference": reference.id,
                         "sampling_flops_per_image": float(nfe * flops_forward), "wall_s": time.time() - started,
                         **conditioning_keys(config)})
        with MetricsWriter(run_dir / METRICS_FILE) as writer:
            for row in rows:
                if row["kind"] == "eval":
                    writer.write(row)
    return rows
