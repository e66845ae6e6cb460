"""Dropout whose masks can be recorded in one forward pass and replayed, by row, in another.

ECT's target f(x_r, r) must use the online pass's dropout masks. locuslab/ect restores the RNG state
and draws them again; :func:`record_masks` / :func:`replay_masks` keep the online pass's masks
instead and hand the target pass the rows it needs (ECT runs the target only on rows with r > 0),
so no mask is drawn twice and a row subset needs no full-batch draw.

The recorded mask is exactly the one ``F.dropout`` would apply: ``F.dropout(ones)`` consumes the
RNG as ``F.dropout(h)`` does for an ``h`` of the same shape, dtype and device, so recording changes
neither the masks nor the random stream.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F


class ReplayableDropout(nn.Dropout):
    """``nn.Dropout`` (same behaviour and state dict) that can record and replay its mask.

    Modes: ``None`` (plain dropout), ``"record"`` (keep the mask of this call), ``"replay"`` (apply
    the recorded mask's rows ``replay_rows`` instead of drawing). Each instance must run once per
    forward pass, which holds for every block of cmscale's networks.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self.mode: str | None = None
        self.mask: torch.Tensor | None = None
        self.replay_rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.mode == "replay":
            if self.mask is None:
                raise RuntimeError("ReplayableDropout: replay without a recorded mask (record the online pass first)")
            return x * self.mask[self.replay_rows].to(x.dtype)
        if self.mode == "record":
            if self.mask is not None:
                raise RuntimeError("ReplayableDropout ran twice while recording; each block must run once per pass")
            self.mask = F.dropout(torch.ones_like(x), self.p, training=True)
            return x * self.mask
        return F.dropout(x, self.p, training=True)


_DROPOUTS: weakref.WeakKeyDictionary[nn.Module, list[ReplayableDropout]] = weakref.WeakKeyDictionary()


def _dropouts(model: nn.Module) -> list[ReplayableDropout]:
    # Cached per model: ECT records, replays and clears on every step, and walking the module
    # tree three times a step was a few percent of a small network's step.
    if model not in _DROPOUTS:
        _DROPOUTS[model] = [module for module in model.modules() if isinstance(module, ReplayableDropout)]
    return _DROPOUTS[model]


@contextmanager
def record_masks(model: nn.Module):
    """Record every ReplayableDropout mask of ``model`` during the block (masks stay until cleared)."""
    layers = _dropouts(model)
    for layer in layers:
        layer.mode, layer.mask = "record", None
    try:
        yield
    finally:
        for layer in layers:
            layer.mode = None


@contextmanager
def replay_masks(model: nn.Module, rows: torch.Tensor):
    """Apply the recorded masks' ``rows`` (an index tensor into the recorded batch) during the block."""
    layers = _dropouts(model)
    for layer in layers:
        layer.mode, layer.replay_rows = "replay", rows
    try:
        yield
    finally:
        for layer in layers:
            layer.mode, layer.replay_rows = None, None


def clear_masks(model: nn.Module) -> None:
    """Drop recorded masks (they hold activation-sized memory until the next step otherwise)."""
    for layer in _dropouts(model):
        layer.mask = None
