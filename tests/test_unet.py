"""The UNet (cmscale.models.unet): shapes and resolutions it refuses."""

from __future__ import annotations

import pytest
import torch

from cmscale.models.presets import PRESETS, build_unet
from cmscale.models.unet import UNet


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


def test_unet_rejects_indivisible_resolution():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(img_resolution=18, img_channels=1, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1)
