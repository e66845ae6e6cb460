"""The UNet family: shapes, preset growth, and FLOP counting against hand-computed values."""

import pytest
import torch
from torch import nn

from cmscale.models.flops import count_flops, forward_flops, meta_copy
from cmscale.models.presets import PRESETS, build_unet
from cmscale.models.unet import UNet, count_parameters


@pytest.mark.parametrize("resolution,channels", [(16, 1), (32, 3)])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_unet_output_shape_equals_input_shape(preset, resolution, channels):
    # Large presets are checked on the meta device: shapes propagate without arithmetic.
    device = "cpu" if PRESETS[preset].model_channels <= 8 or preset in ("xs", "s") else "meta"
    with torch.device(device):
        net = build_unet(preset, resolution, channels)
        x = torch.randn(2, channels, resolution, resolution)
        out = net(x, torch.randn(2))
    assert out.shape == x.shape


def test_preset_parameter_counts_grow_geometrically():
    # Two ladders of cmscale's own UNet in the one table: the fine t<width> ladder (the demo's sizes,
    # about 2x apart) and the named sizes xxs..xl (2-4x apart); each grows geometrically in table order.
    unet = [name for name, spec in PRESETS.items() if spec.architecture == "unet"]
    for family in ([n for n in unet if n.startswith("t")], [n for n in unet if not n.startswith("t")]):
        counts = [count_parameters(meta_copy(lambda n=name: build_unet(n, 32, 3))) for name in family]
        ratios = [b / a for a, b in zip(counts, counts[1:])]
        assert len(counts) >= 5 and all(1.6 <= r <= 4.5 for r in ratios), (family, ratios)
    # The largest preset is the DDPM++ CIFAR-10 scale of EDM (about 56M parameters).
    assert 50e6 < counts[-1] < 62e6


def test_unet_rejects_indivisible_resolution():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(img_resolution=18, img_channels=1, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1)


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
