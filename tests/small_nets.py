"""Small UNets with random (non-zero) weights, images and a teacher checkpoint, for tests of the
preconditioners, samplers, losses and methods against their equations.

The weights are random because the UNet's zero-initialised output layers would make F = 0 and hide errors
in the maps. Checks that need tight tolerances run in float64."""

from __future__ import annotations

import math

import torch

from cmscale.config import RunConfig
from cmscale.methods import build_method
from cmscale.models.unet import UNet

SD = 0.5


def random_unet(
    seed: int = 0, dtype: torch.dtype = torch.float64, attention: bool = True, dropout: float = 0.0
) -> UNet:
    """A small UNet (with attention at 4x4) whose every weight is random, so F is far from zero."""
    torch.manual_seed(seed)
    net = UNet(
        img_resolution=8,
        img_channels=1,
        model_channels=8,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(4,) if attention else (),
        dropout=dropout,
    )
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 1.0 / math.sqrt(parameter[0].numel()))
            elif "norm" not in name:
                parameter.normal_(0, 0.1)
    return net.to(dtype)


def images(batch: int = 4, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, 8, 8, generator=generator) * 2 - 1).to(dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _write_teacher(path, seed: int = 7) -> None:
    """A 'pretrained' xxs teacher: random non-zero weights, saved like a final.pt."""
    torch.manual_seed(seed)
    config = RunConfig(method="edm", preset="xxs", budget_iters=1)
    net = build_method(config, img_channels=1).model.net
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 0.5 / math.sqrt(parameter[0].numel()))
    torch.save({"net": net.state_dict()}, path)
