"""The trainer's batches: the images of step s are a function of (seed, s, rank) only.

:class:`StepBatches` is the one loader path (the trainer and ``benchmarks/gpu_check.py`` both use
it); ``batches(step)`` gives this rank's share of the step's batch as floats in [-1, 1] (or the
network's latents), ``batches.labels(step)`` the same rows' class labels, ``batches.batch(step)``
both. Because a step's rows depend on nothing but (seed, step, rank), a resumed run and a
data-parallel run see exactly the images an uninterrupted run sees.

Two storages, chosen by :func:`cmscale.data.load_dataset`:

- In memory (digits, CIFAR-10, small image folders): indices drawn on the CPU from a generator
  seeded by ``step_seed(seed, step)``, with replacement. On a GPU the uint8 images are copied to
  the device once (under ``max_device_bytes``), so a step's loading is a gather on the device.
- Streamed (large image folders and zips, VAE latents): epoch ``e`` visits the set in the order of
  a permutation seeded by (seed, e); step s takes positions ``[s B, (s+1) B)`` of the concatenated
  epochs, and rank r its slice of them, so each rank reads only its own shard. DataLoader workers
  read and decode the items (pinned memory on CUDA) a few steps ahead; the worker count fits the
  process's CPU allocation (:func:`loader_workers`).

A worker writes each batch straight into shared memory (as torch's ``default_collate`` does), and
for a CPU run already as floats in [-1, 1]; on CUDA it stays uint8 until it is on the device. So
the main process makes no batch-sized allocation per step. It used to (the uint8 batch to floats,
two 24 MB blocks a step at 500 64x64 images), and glibc's heap kept the freed blocks instead of
reusing them: on some runs one epoch of 200,000 images grew the main process by 3 GB of free heap,
where it now grows by under 50 MiB (``test_streaming_200k_images_...``).
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from cmscale.data.archive import LATENTS, ArchiveDataset
from cmscale.data.datasets import ImageData, _resize_uint8
from cmscale.data.latents import LatentScaling

DEFAULT_MAX_DEVICE_BYTES = 4 * 2**30
MAX_LOADER_WORKERS = 8
PREFETCH_STEPS = 2  # batches each worker reads ahead
_LATENT_NOISE_SALT = 0x5EED_1A7E  # keeps the posterior draw's stream apart from the trainer's step noise


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of one step on one rank (rank 0's seed also picks the step's images)."""
    return ((seed * 1_000_003 + step) * 4096 + rank) % (2**63)


def loader_workers(requested: int | None = None) -> int:
    """DataLoader workers for this process: ``requested``, else ``CMSCALE_DATA_WORKERS``, else the
    CPUs this task may use (SLURM's ``SLURM_CPUS_PER_TASK``, or the affinity mask) less one for the
    training loop itself, between 1 and 8."""
    if requested is not None:
        return requested
    if os.environ.get("CMSCALE_DATA_WORKERS"):
        return int(os.environ["CMSCALE_DATA_WORKERS"])
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    available = int(cpus) if cpus and cpus.isdigit() else len(os.sched_getaffinity(0))
    return max(1, min(MAX_LOADER_WORKERS, available - 1))


class Batch(NamedTuple):
    """One step's rows on one rank: ``images`` (floats) and ``labels`` (int64 [N], or None)."""

    images: torch.Tensor
    labels: torch.Tensor | None


class EpochOrder:
    """Which items rank ``rank`` reads at each step of a streamed set (epoch permutations)."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, per_rank: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.first = rank * per_rank
        self.per_rank = per_rank
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 3:  # the sampler runs a few steps ahead of labels(step)
                self._orders.pop(min(self._orders))
            generator = torch.Generator().manual_seed(step_seed(self.seed, epoch, rank=4095))
            self._orders[epoch] = torch.randperm(self.num_items, generator=generator).numpy()
        return self._orders[epoch]

    def indices(self, step: int) -> np.ndarray:
        positions = step * self.batch_size + self.first + np.arange(self.per_rank, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_items)
        result = np.empty(self.per_rank, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            result[mask] = self.order(int(epoch))[offsets[mask]]
        return result


class _StepSampler:
    """The DataLoader's batch sampler: this rank's indices for steps ``start``, ``start + 1``, ..."""

    def __init__(self, order: EpochOrder, start: int):
        self.order, self.start = order, start

    def __iter__(self):
        step = self.start
        while True:
            yield self.order.indices(step).tolist()
            step += 1


def to_unit_range_(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixel values 0..255 mapped in place to [-1, 1] (``x / 127.5 - 1``, bitwise as the
    in-memory path's ``ImageData.batch``)."""
    return pixels.div_(127.5).sub_(1.0)


def _empty_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch; inside a DataLoader worker it lives in shared memory, so it reaches
    the main process as a mapping (unmapped when freed) instead of a copy through either heap."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _collate(items: list[np.ndarray], resolution: int | None = None, unit_range: bool = False) -> torch.Tensor:
    """Stack a step's items; ``unit_range`` (pixels on a CPU run) also maps them to floats in [-1, 1]."""
    rows = [torch.from_numpy(item) for item in items]
    if resolution is not None and rows[0].dtype == torch.uint8 and rows[0].shape[-1] != resolution:
        rows = _resize_uint8(torch.stack(rows), resolution)
    dtype = torch.float32 if unit_range else rows[0].dtype
    batch = _empty_batch((len(rows), *rows[0].shape), dtype)
    for target, row in zip(batch, rows):
        target.copy_(row)  # uint8 to float is exact
    return to_unit_range_(batch) if unit_range else batch


class StepBatches:
    """``batches(step)`` -> this rank's share of the step's batch on ``device``; see the module doc."""

    def __init__(self, data: ImageData | ArchiveDataset, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, device: torch.device | str = "cpu",
                 max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES, num_workers: int | None = None,
                 latent_scaling: LatentScaling | None = None):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {world} ranks; "
                             "set batch_size to a multiple of the world size")
        self.batch_size = batch_size
        self.per_rank = batch_size // world
        self.seed = seed
        self.rank = rank
        self.device = torch.device(device)
        self.num_images = len(data)
        self.label_dim = data.label_dim
        self.streamed = isinstance(data, ArchiveDataset)
        self.latent = self.streamed and data.kind == LATENTS
        self.latent_scaling = (latent_scaling or LatentScaling()) if self.latent else None
        if self.streamed:
            self.data = data
            self.order = EpochOrder(len(data), batch_size, seed, rank, self.per_rank)
            self.num_workers = loader_workers(num_workers)
            self._labels = torch.from_numpy(data.labels) if data.labels is not None else None
            # A CPU run's pixels come from the workers as floats; on CUDA the uint8 batch is copied
            # (a quarter of the bytes) and converted on the device.
            self._unit_range = not self.latent and self.device.type == "cpu"
            self._iterator = None
            self._next_step: int | None = None
        else:
            images = data.images
            if self.device.type != "cpu" and images.numel() * images.element_size() <= max_device_bytes:
                images = images.to(self.device)
            self.images = images
            self.num_workers = 0
            self._labels = data.labels if data.label_dim else None

    # -- which rows --------------------------------------------------------------------------
    def indices(self, step: int) -> torch.Tensor:
        """Indices (on the CPU) of this rank's images at ``step``."""
        if self.streamed:
            return torch.from_numpy(self.order.indices(step))
        generator = torch.Generator().manual_seed(step_seed(self.seed, step))
        indices = torch.randint(self.num_images, (self.batch_size,), generator=generator)
        return indices[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def labels(self, step: int) -> torch.Tensor | None:
        """Class labels (int64 [N] on ``device``) of the rows ``batches(step)`` returns; None when
        the data set has no labels (``label_dim == 0``)."""
        if self._labels is None:
            return None
        return self._labels[self.indices(step)].to(self.device, non_blocking=True)

    def batch(self, step: int) -> Batch:
        return Batch(self(step), self.labels(step))

    # -- the rows -----------------------------------------------------------------------------
    def __call__(self, step: int) -> torch.Tensor:
        if self.streamed:
            return self._streamed(step)
        indices = self.indices(step)
        if self.images.device != indices.device:
            indices = indices.to(self.images.device, non_blocking=True)
        return self.images[indices].to(self.device, non_blocking=True).float() / 127.5 - 1.0

    def _streamed(self, step: int) -> torch.Tensor:
        if self._iterator is None or step != self._next_step:
            self.close()  # a jump (resume, re-evaluation) restarts the workers at this step
            loader = torch.utils.data.DataLoader(
                self.data, batch_sampler=_StepSampler(self.order, step), num_workers=self.num_workers,
                collate_fn=partial(_collate, resolution=self.data.target_resolution, unit_range=self._unit_range),
                pin_memory=self.device.type == "cuda",
                prefetch_factor=PREFETCH_STEPS if self.num_workers else None)
            self._iterator = iter(loader)
        raw = next(self._iterator).to(self.device, non_blocking=True)
        self._next_step = step + 1
        if self.latent:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(step_seed(self.seed, step, self.rank) ^ _LATENT_NOISE_SALT)
            return self.latent_scaling.sample(raw, generator)
        return raw if self._unit_range else to_unit_range_(raw.float())

    def close(self) -> None:
        """Stop the DataLoader workers (they also stop when this object is collected)."""
        self._iterator = None
        self._next_step = None
