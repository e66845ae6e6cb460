"""Named model sizes: the one table of UNet presets.

Each preset fixes the width, depth and attention placement of :class:`~cmscale.models.unet.UNet`;
resolution and channels come from the dataset. Attention is placed by level (0 = full resolution),
so a preset means the same architecture at 16x16 digits and at 32x32 CIFAR-10. Parameter counts
grow by about 2-4x per step; ``xl`` is the DDPM++ CIFAR-10 network of EDM (about 56M parameters).

The ``t<width>`` presets are a finer ladder below ``xxs`` (about 12k to 400k parameters on 8x8
grey digits): two resolution levels, no attention outside the middle block, named by their base
width. At these sizes a CPU can train every size of a scaling study to comparable convergence in
minutes, which is what the demo study (``cmscale demo``) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cmscale.models.unet import UNet


@dataclass(frozen=True)
class Preset:
    name: str
    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_levels: tuple[int, ...]

    def attn_resolutions(self, img_resolution: int) -> tuple[int, ...]:
        return tuple(img_resolution >> level for level in self.attn_levels)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in [
        Preset("t4", model_channels=4, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
        Preset("t6", model_channels=6, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
        Preset("t8", model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
        Preset("t12", model_channels=12, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
        Preset("t16", model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
        Preset("t24", model_channels=24, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
        Preset("xxs", model_channels=8, channel_mult=(1, 2, 2), num_blocks=1, attn_levels=()),
        Preset("xs", model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_levels=()),
        Preset("s", model_channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_levels=(1,)),
        Preset("m", model_channels=48, channel_mult=(1, 2, 2), num_blocks=2, attn_levels=(1,)),
        Preset("l", model_channels=96, channel_mult=(1, 2, 2), num_blocks=2, attn_levels=(1,)),
        Preset("xl", model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_levels=(1,)),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_unet(preset: str, img_resolution: int, img_channels: int, dropout: float = 0.0) -> UNet:
    spec = get_preset(preset)
    return UNet(
        img_resolution=img_resolution,
        img_channels=img_channels,
        model_channels=spec.model_channels,
        channel_mult=spec.channel_mult,
        num_blocks=spec.num_blocks,
        attn_resolutions=spec.attn_resolutions(img_resolution),
        dropout=dropout,
    )
