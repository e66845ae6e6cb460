"""The learning-rate schedule of a run: linear warm-up, then constant or a cosine decay."""

from __future__ import annotations

import math

from cmscale.config import RunConfig


def learning_rate(config: RunConfig, step: int, iterations: int) -> float:
    """The lr of optimiser step ``step`` (0-based) of a run of ``iterations`` steps.

    Linear warm-up over ``lr_warmup_iters``; then constant, or (``lr_schedule = "cosine"``)
        lr * (f + (1 - f) (1 + cos(pi p)) / 2),  p = (step - warmup) / (iterations - 1 - warmup),
    which starts at lr and reaches lr * f (f = ``lr_final_ratio``) on the last step; or
    (``lr_schedule = "inv_sqrt"``, EDM2's) lr / sqrt(max(step / lr_ref_batches, 1)): EDM2 divides the
    images seen before the step by ref_batches batches, the same ratio (its ramp-up is lr_warmup_iters).
    """
    warmup = config.lr_warmup_iters
    if warmup and step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "inv_sqrt":  # EDM2's learning_rate_schedule, counted in optimiser steps
        return config.lr / math.sqrt(max(step / config.lr_ref_batches, 1.0))
    progress = min(1.0, (step - warmup) / max(1, iterations - 1 - warmup))
    final = config.lr_final_ratio
    return config.lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))
