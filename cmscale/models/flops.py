"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode``.

Convention: 2 FLOPs per multiply-add (so a matmul of (m,k)x(k,n) is 2mkn FLOPs). Papers that
count MACs (e.g. EDM2) report half of these numbers. Only matmuls, convolutions and attention
products are counted, as FlopCounterMode does; elementwise ops and norms are not.

Counting runs on the ``meta`` device where possible: shapes only, no arithmetic, so counting the
56M-parameter preset costs milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cmscale.models.attention import matmul_attention

FLOP_CONVENTION = "2 FLOPs per multiply-add (FlopCounterMode); elementwise ops not counted"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` runs (forward, and backward if it calls ``.backward()``).

    Attention is counted as its two matmuls: FlopCounterMode counts SDPA's CUDA kernels but not
    its CPU kernel, and the two paths do the same multiply-adds.
    """
    with matmul_attention(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def forward_flops(net: nn.Module, batch_size: int = 1) -> int:
    """FLOPs of one forward pass of a UNet on ``batch_size`` images."""
    device = next(net.parameters()).device
    x = torch.zeros(batch_size, net.img_channels, net.img_resolution, net.img_resolution, device=device)
    c_noise = torch.zeros(batch_size, device=device)
    with torch.no_grad():
        return count_flops(lambda: net(x, c_noise))


def meta_copy(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module on the meta device (no memory, no init cost) for counting."""
    with torch.device("meta"):
        return build()
