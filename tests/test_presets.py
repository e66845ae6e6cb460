"""Size presets (cmscale.models.presets): parameter counts grow geometrically."""

from __future__ import annotations

from cmscale.models.flops import meta_copy
from cmscale.models.presets import PRESETS, build_unet
from cmscale.models.unet import count_parameters


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
