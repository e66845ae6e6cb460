"""Named model sizes: the one table of network presets.

Each preset fixes the architecture, width, depth and attention placement; resolution and channels
come from the dataset. Attention is placed by level (0 = full resolution), so a preset means the
same architecture at 16x16 digits and at 32x32 CIFAR-10.

Architectures:

- ``unet``: cmscale's own DDPM++-style :class:`~cmscale.models.unet.UNet` (presets ``xxs`` to ``xl``;
  parameter counts grow by about 2-4x per step; ``xl`` is close to, but not equal to, EDM's DDPM++).
- ``ddpmpp``: EDM's exact DDPM++ (:class:`~cmscale.models.edm_networks.SongUNet`), whose state dict
  is EDM's. ``ddpmpp`` is the EDM CIFAR-10 network (55.7M parameters at 32x32x3) that
  ``cmscale teacher import`` produces from EDM's published pickle; the narrower ``ddpmpp-*``
  presets keep its layout at smaller widths (a scaling family on the exact architecture).
- ``adm``: EDM's ADM (:class:`~cmscale.models.edm_networks.DhariwalUNet`) at its ImageNet-64
  configuration, unconditional.

- ``edm2``: EDM2's magnitude-preserving UNet with its log-variance head
  (:class:`~cmscale.models.edm2.EDM2Net`, whose state dict is that of EDM2's ``Precond``), under
  EDM2's own names: ``edm2-img64-*`` (64x64x3 ImageNet) and ``edm2-img512-*`` (ImageNet 512 in
  SD-VAE latent space, 64x64x4). At those shapes and 1,000 classes their parameter counts equal those
  of EDM2's own ``Precond`` (checked in tests/test_edm2.py), e.g. edm2-img64-s 280,209,381 and
  edm2-img512-xxl 1,523,164,773. The img64 and img512 ladders share widths; they differ in data.

``label_dim`` is the preset's published class count (1000 for EDM2's ImageNet networks, 0 for the
unconditional ones); a run or ``models list --label-dim`` can override it.

``ddpmpp`` presets carry EDM's 9-dimensional augmentation-label layer (``map_augment``) so that
EDM's CIFAR-10 checkpoints load strictly; it is unused unless augmentation labels are passed.

The ``t<width>`` presets are a finer ladder below ``xxs`` (about 3k to 400k parameters on 8x8
grey digits): two resolution levels, no attention outside the middle block, named by their base
width. At these sizes a CPU can train every size of a scaling study to comparable convergence in
minutes, which is what the demo study (``cmscale demo``) needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from cmscale.models.edm2 import EDM2Net
from cmscale.models.edm_networks import DhariwalUNet, SongUNet
from cmscale.models.unet import UNet

Architecture = Literal["unet", "ddpmpp", "adm", "edm2"]


@dataclass(frozen=True)
class Preset:
    name: str
    model_channels: int
    channel_mult: tuple[int, ...]
    num_blocks: int
    attn_levels: tuple[int, ...]
    architecture: Architecture = "unet"
    augment_dim: int = 0  # EDM's augmentation-label width (ddpmpp/adm only)
    label_dim: int = 0  # the published configuration's class count (0: unconditional)

    def attn_resolutions(self, img_resolution: int) -> tuple[int, ...]:
        return tuple(img_resolution >> level for level in self.attn_levels)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in [
        Preset("t2", model_channels=2, channel_mult=(1, 2), num_blocks=1, attn_levels=()),
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
        # EDM's DDPM++ (CIFAR-10: 128 channels, mult (2, 2, 2), 4 blocks, attention at 16x16) and narrower copies.
        Preset("ddpmpp-xxs", model_channels=8, channel_mult=(2, 2, 2), num_blocks=4, attn_levels=(1,),
               architecture="ddpmpp", augment_dim=9),
        Preset("ddpmpp-s", model_channels=32, channel_mult=(2, 2, 2), num_blocks=4, attn_levels=(1,),
               architecture="ddpmpp", augment_dim=9),
        Preset("ddpmpp-m", model_channels=64, channel_mult=(2, 2, 2), num_blocks=4, attn_levels=(1,),
               architecture="ddpmpp", augment_dim=9),
        Preset("ddpmpp", model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_levels=(1,),
               architecture="ddpmpp", augment_dim=9),
        # EDM's ADM at ImageNet-64 (192 channels, mult (1, 2, 3, 4), 3 blocks, attention at 32, 16, 8).
        Preset("adm", model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_levels=(1, 2, 3),
               architecture="adm"),
        # EDM2's architecture at CPU scale (two levels, one block, attention at level 1): digits-sized ladders.
        Preset("edm2-t16", model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,),
               architecture="edm2"),
        Preset("edm2-t32", model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,),
               architecture="edm2"),
        # EDM2 (train_edm2.py's config_presets): channel_mult (1, 2, 3, 4), 3 blocks, attention at 16 and 8
        # (levels 2, 3 at 64x64), 1,000 ImageNet classes; XS..XXL differ in width only.
        *[
            Preset(f"edm2-{data}-{size}", model_channels=width, channel_mult=(1, 2, 3, 4), num_blocks=3,
                   attn_levels=(2, 3), architecture="edm2", label_dim=1000)
            for data, sizes in (("img64", "xs s m l xl"), ("img512", "xs s m l xl xxl"))
            for size, width in zip(sizes.split(), (128, 192, 256, 320, 384, 448))
        ],
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# Each family's layout where a spec-defined model gives only its width and depth (its published setting).
FAMILY_LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    # family: (channel_mult, attention levels, augment_dim)
    "unet": ((1, 2, 2), (1,), 0),
    "ddpmpp": ((2, 2, 2), (1,), 9),
    "adm": ((1, 2, 3, 4), (1, 2, 3), 0),
    "edm2": ((1, 2, 3, 4), (2, 3), 0),
}


def defined_preset(name: str, family: str, channels: int, blocks: int, channel_mult: Sequence[int] | None = None,
                   attn_levels: Sequence[int] | None = None) -> Preset:
    """A model a sweep spec defines by family and width (``[models.NAME]``), as a :class:`Preset`;
    unset layout fields take the family's (:data:`FAMILY_LAYOUTS`)."""
    if family not in FAMILY_LAYOUTS:
        raise ValueError(f"model {name!r}: family {family!r} is not one of {', '.join(FAMILY_LAYOUTS)}")
    mult, levels, augment_dim = FAMILY_LAYOUTS[family]
    return Preset(name, model_channels=channels, channel_mult=tuple(channel_mult or mult), num_blocks=blocks,
                  attn_levels=tuple(levels if attn_levels is None else attn_levels), architecture=family,
                  augment_dim=augment_dim)


def build_unet(preset: str | Preset, img_resolution: int, img_channels: int, dropout: float = 0.0,
               label_dim: int | None = None, dropout_res: int | None = None) -> nn.Module:
    """The network of ``preset``: ``forward(x, c_noise) -> F``, with ``img_resolution``/``img_channels`` attributes.

    ``label_dim`` None takes the preset's own (see :class:`Preset`); cmscale's own ``unet`` takes no labels.
    ``dropout_res`` (EDM2 only): dropout only at feature resolutions <= this.
    """
    spec = preset if isinstance(preset, Preset) else get_preset(preset)
    label_dim = spec.label_dim if label_dim is None else label_dim
    common = dict(img_resolution=img_resolution, img_channels=img_channels, model_channels=spec.model_channels,
                  channel_mult=spec.channel_mult, num_blocks=spec.num_blocks,
                  attn_resolutions=spec.attn_resolutions(img_resolution), dropout=dropout)
    if spec.architecture == "edm2":
        return EDM2Net(**common, label_dim=label_dim, dropout_res=dropout_res)
    if spec.architecture == "ddpmpp":
        return SongUNet(**common, augment_dim=spec.augment_dim, label_dim=label_dim)
    if spec.architecture == "adm":
        return DhariwalUNet(**common, augment_dim=spec.augment_dim, label_dim=label_dim)
    if label_dim:
        raise ValueError(f"preset {spec.name!r} (cmscale's unet) takes no class labels; label_dim {label_dim} needs an "
                         "edm2-*, ddpmpp* or adm preset")
    return UNet(**common)


FAMILIES = {"unet": UNet, "ddpmpp": SongUNet, "adm": DhariwalUNet, "edm2": EDM2Net}


def build_network(architecture: dict) -> nn.Module:
    """The network an ``{'family': ..., 'kwargs': {...}}`` record describes (an imported teacher's checkpoint
    carries one): any width, depth and resolution, with no preset needed."""
    family = architecture.get("family") if isinstance(architecture, dict) else None
    if family not in FAMILIES:
        raise ValueError(f"architecture family {family!r} is not one of {', '.join(FAMILIES)}")
    kwargs = dict(architecture.get("kwargs") or {})
    for key in ("channel_mult", "attn_resolutions", "resample_filter"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    return FAMILIES[family](**kwargs)
