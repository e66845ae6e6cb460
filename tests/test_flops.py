"""FLOP counting (cmscale.models.flops) against hand-computed values."""

from __future__ import annotations

import torch
from torch import nn

from cmscale.models.flops import count_flops, forward_flops, meta_copy
from cmscale.models.presets import build_unet


def test_flop_count_of_conv_and_linear_matches_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, kernel_size=3, padding=1), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    x = torch.randn(4, 3, 10, 10)
    # 2 FLOPs per multiply-add: conv = 2 * B * Cout * H * W * Cin * k * k; linear = 2 * B * in * out.
    conv_flops = 2 * 4 * 8 * 10 * 10 * 3 * 3 * 3
    linear_flops = 2 * 4 * 800 * 5
    assert count_flops(lambda: model(x)) == conv_flops + linear_flops


def test_training_step_flops_are_three_forwards_for_linear():
    model = nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16, requires_grad=True)
    forward = 2 * 8 * 16 * 32
    # With grads for input and weight, backward is two matmuls the size of the forward one.
    assert count_flops(lambda: model(x).sum().backward()) == 3 * forward


def test_forward_flops_scale_linearly_with_batch():
    net = meta_copy(lambda: build_unet("xs", 16, 1))
    assert forward_flops(net, batch_size=4) == 4 * forward_flops(net, batch_size=1)
