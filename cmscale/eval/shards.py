"""FID over 50,000 samples split across ranks or array tasks: shards write features, one task reduces.

The samples of an evaluation are cut into chunks of ``eval.batch_size``; chunk k is drawn from a
generator seeded by (``eval.seed``, k) and, in a class-conditional run, sample j has class
``j mod label_dim`` (:func:`cmscale.sampling.balanced_labels`: every class gets
``num_samples / label_dim`` samples, within one), guided as the run's evals are. Shard i of n
samples the chunks k with ``k mod n = i``, decodes them to pixels (through the VAE in a latent
run), and writes each chunk's features to its own file (atomically), so a killed
task that runs again skips the chunks already written. Because a chunk's samples depend on
nothing but (seed, k), the features, and so the statistics reduced from them in chunk order, are
the same however the chunks were split.

The reduction concatenates the chunks' features in order, fits ``mu`` and ``sigma`` with
torch-fidelity and scores FID against the reference, and KID (torch-fidelity's, against the
reference images' cached features) when the reference is a local image set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmscale.config import RunConfig
from cmscale.eval.features import FeatureSpace
from cmscale.eval.fid import (
    Scores,
    features_of,
    fid_to_stats,
    kid_between,
    reference_features,
    reference_statistics,
)
from cmscale.eval.reference import PublishedReference
from cmscale.sampling import balanced_labels, sample

SHARDS_DIR = "eval-shards"
META_FILE = "meta.json"


class ShardError(ValueError):
    """Shards that cannot be reduced (missing chunks, another evaluation's files); names the fix."""


def chunk_seed(seed: int, chunk: int) -> int:
    return (seed * 1_000_003 + chunk * 7919 + 17) % (2**63)


def shard_from_environment() -> tuple[int, int]:
    """(index, count) of this task: a SLURM array task, else a torchrun rank, else (0, 1)."""
    for index_key, count_key in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE")):
        if os.environ.get(index_key) and os.environ.get(count_key):
            return int(os.environ[index_key]), int(os.environ[count_key])
    return 0, 1


@dataclass(frozen=True)
class ShardPlan:
    """One evaluation (a checkpoint step, a sampler step count, a sample count) cut into chunks."""

    folder: Path
    num_samples: int
    chunk: int
    steps: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk)

    def chunk_path(self, index: int) -> Path:
        return self.folder / f"features-{index:06d}.npy"

    def chunk_range(self, index: int) -> tuple[int, int]:
        return index * self.chunk, min(self.num_samples, (index + 1) * self.chunk)

    def missing(self) -> list[int]:
        return [k for k in range(self.num_chunks) if not self.chunk_path(k).is_file()]


def shard_plan(run_dir: Path, config: RunConfig, step: int, steps: int, num_samples: int) -> ShardPlan:
    folder = Path(run_dir) / SHARDS_DIR / f"step{step:08d}-{steps}steps-{num_samples}samples"
    return ShardPlan(folder, num_samples, config.eval.batch_size, steps)


def _check_meta(plan: ShardPlan, meta: dict) -> None:
    path = plan.folder / META_FILE
    if path.is_file():
        found = json.loads(path.read_text())
        if found != meta:
            different = sorted(key for key in meta if found.get(key) != meta[key])
            raise ShardError(f"{path}: these shards were written with other settings ({', '.join(different)}); "
                             f"delete {plan.folder} or evaluate with the settings it records")
        return
    plan.folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{META_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)


def _meta(config: RunConfig, plan: ShardPlan, space: FeatureSpace) -> dict:
    return {"num_samples": plan.num_samples, "chunk": plan.chunk, "seed": config.eval.seed, "steps": plan.steps,
            "extractor": space.registered_name, "label_dim": config.label_dim, "guidance": config.guidance,
            "method": config.method}


@torch.no_grad()
def write_shard(config: RunConfig, model: nn.Module, plan: ShardPlan, shard: tuple[int, int], space: FeatureSpace,
                decode, device: torch.device, channels: int, guide: nn.Module | None = None) -> list[int]:
    """Sample, decode and extract the features of this shard's chunks not on disk; returns those written."""
    index, count = shard
    if not 0 <= index < count:
        raise ShardError(f"shard {index}/{count}: the index must lie in [0, {count})")
    _check_meta(plan, _meta(config, plan, space))
    written = []
    was_training = model.training
    model.eval()
    try:
        for chunk_index in range(index, plan.num_chunks, count):
            path = plan.chunk_path(chunk_index)
            if path.is_file():
                continue
            start, stop = plan.chunk_range(chunk_index)
            generator = torch.Generator(device=device).manual_seed(chunk_seed(config.eval.seed, chunk_index))
            shape = (stop - start, channels, config.resolution, config.resolution)
            labels = balanced_labels(start, stop - start, config.label_dim, device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                samples, nfe = sample(config, model, shape, plan.steps, generator, device, labels, guide)
            features = features_of(decode(samples), space, device, plan.chunk).cpu().numpy()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                np.save(handle, features.astype(np.float32))
            os.replace(tmp, path)
            (plan.folder / "nfe.json").write_text(json.dumps({"nfe": int(nfe)}))
            written.append(chunk_index)
    finally:
        model.train(was_training)
    return written


def reduce_shards(plan: ShardPlan, reference, device: torch.device | str = "cpu",
                  kid_subsets: int = 0) -> tuple[Scores, int]:
    """FID (and KID against a local image set, when ``kid_subsets``) of all chunks' features;
    refuses while chunks are missing."""
    missing = plan.missing()
    if missing:
        shown = ", ".join(str(k) for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ShardError(f"{plan.folder}: {len(missing)} of {plan.num_chunks} chunks have no features yet (chunks "
                         f"{shown}; chunk k belongs to shard k mod n): run those shards again (finished chunks are "
                         "skipped), then reduce")
    features = torch.from_numpy(np.concatenate([np.load(plan.chunk_path(k)) for k in range(plan.num_chunks)]))
    nfe = json.loads((plan.folder / "nfe.json").read_text())["nfe"]
    if isinstance(reference, PublishedReference):
        return Scores(fid_to_stats(features, reference.stats())), nfe
    _, stats = reference_statistics(reference.data, reference.space, device)
    fid = fid_to_stats(features, stats)
    if not kid_subsets:
        return Scores(fid), nfe
    return Scores(fid, *kid_between(features, reference_features(reference, device), kid_subsets)), nfe
