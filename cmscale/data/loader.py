"""The trainer's batches: the images of step s are a function of (seed, s) only, split across ranks.

:class:`StepBatches` is the one loader path (the trainer and ``benchmarks/gpu_check.py`` both use
it). Indices are drawn on the CPU from a generator seeded by ``step_seed(seed, step)``, so a resumed
run and a data-parallel run see exactly the images an uninterrupted single-process run sees. On a
GPU the uint8 images are copied to the device once (when they fit under ``max_device_bytes``:
CIFAR-10 is 150 MB), so a step's loading is a gather and a conversion on the device rather than a
host copy of float images; otherwise the uint8 batch is gathered on the host and converted on the
device (a quarter of the bytes of a float copy).
"""

from __future__ import annotations

import torch

from cmscale.data.datasets import ImageData

DEFAULT_MAX_DEVICE_BYTES = 4 * 2**30


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed of one step on one rank (rank 0's seed also picks the step's images)."""
    return ((seed * 1_000_003 + step) * 4096 + rank) % (2**63)


class StepBatches:
    """``batches(step)`` -> this rank's share of the step's batch, floats in [-1, 1] on ``device``."""

    def __init__(self, data: ImageData, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {world} ranks; "
                             "set batch_size to a multiple of the world size")
        self.batch_size = batch_size
        self.per_rank = batch_size // world
        self.seed = seed
        self.rank = rank
        self.device = torch.device(device)
        self.num_images = len(data)
        images = data.images
        if self.device.type != "cpu" and images.numel() * images.element_size() <= max_device_bytes:
            images = images.to(self.device)
        self.images = images

    def indices(self, step: int) -> torch.Tensor:
        """Indices (on the CPU) of this rank's images at ``step``."""
        generator = torch.Generator().manual_seed(step_seed(self.seed, step))
        indices = torch.randint(self.num_images, (self.batch_size,), generator=generator)
        return indices[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]

    def __call__(self, step: int) -> torch.Tensor:
        indices = self.indices(step)
        if self.images.device != indices.device:
            indices = indices.to(self.images.device, non_blocking=True)
        return self.images[indices].to(self.device, non_blocking=True).float() / 127.5 - 1.0
