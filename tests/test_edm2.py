"""EDM2's network (cmscale.models.edm2): EDM2's parameter counts, its equations, forced weight
normalisation, class labels, dropout by resolution, and the explicit JVP path against torch.func.jvp and
finite differences."""

from __future__ import annotations

import pytest
import torch
from edm2_reference import edm2_denoiser
from torch.autograd import forward_ad

from cmscale.config import RunConfig
from cmscale.methods import build_network
from cmscale.models.edm2 import EDM2Net, no_forced_weight_norm
from cmscale.models.flops import count_flops, meta_copy
from cmscale.models.jvp import lean_jvp
from cmscale.models.precond import EDMPrecond
from cmscale.models.presets import PRESETS, build_unet
from cmscale.models.unet import count_parameters

# EDM2's own training.networks_edm2.Precond(64, channels, 1000, model_channels=width), counted with
# NVlabs/edm2 at HEAD (log-variance head included); the EDM2 paper rounds them to 125M .. 1523M.
EDM2_PARAMETER_COUNTS = {
    "edm2-img64-xs": 124_710_949, "edm2-img64-s": 280_209_381, "edm2-img64-m": 497_803_173,
    "edm2-img64-l": 777_492_325, "edm2-img64-xl": 1_119_276_837,
    "edm2-img512-xs": 124_713_253, "edm2-img512-s": 280_212_837, "edm2-img512-m": 497_807_781,
    "edm2-img512-l": 777_498_085, "edm2-img512-xl": 1_119_283_749, "edm2-img512-xxl": 1_523_164_773,
}
SMALL = dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,))


def test_presets_have_the_parameter_counts_of_edm2s_own_precond():
    assert [name for name in PRESETS if name.startswith("edm2-img")] == list(EDM2_PARAMETER_COUNTS)
    for name, expected in EDM2_PARAMETER_COUNTS.items():
        channels = 3 if "img64" in name else 4
        net = meta_copy(lambda name=name, channels=channels: build_unet(name, 64, channels))
        assert count_parameters(net) == expected, name


def _small_net(label_dim: int = 10, seed: int = 0, **overrides) -> EDM2Net:
    torch.manual_seed(seed)
    net = EDM2Net(16, 3, label_dim, **{**SMALL, **overrides}).double()
    with torch.no_grad():  # the gains start at zero, which would hide every block's residual branch
        for parameter in net.parameters():
            parameter.normal_()
    return net.eval()


def _inputs(batch: int = 4):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 3, 16, 16, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0], dtype=torch.float64)[:batch]
    return x, sigma


@pytest.mark.parametrize("with_labels", [False, True])
def test_denoiser_equals_edm2s_equations(with_labels):
    net = _small_net()
    x, sigma = _inputs()
    labels = torch.tensor([0, 3, 7, 9]) if with_labels else None
    onehot = torch.nn.functional.one_hot(labels, 10).double() if with_labels else None
    with torch.no_grad():
        got = EDMPrecond(net)(x, sigma, class_labels=labels)
        want = edm2_denoiser(net.state_dict(), x, sigma, onehot)
        assert got.abs().max() > 0.1
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(EDMPrecond(net)(x, sigma, class_labels=onehot), got, rtol=0, atol=0)


def test_class_labels_out_of_range_are_refused_with_the_range():
    net = _small_net()
    x, sigma = _inputs()
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        net(x, sigma.log() / 4, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"one-hot \[N, 10\]"):
        net(x, sigma.log() / 4, torch.zeros(4, 9, dtype=torch.float64))


def test_forced_weight_normalisation_renormalises_in_training_mode_unless_switched_off():
    net = _small_net().train()
    x, sigma = _inputs()
    layer = net.unet.enc["16x16_conv"]
    before = layer.weight.detach().clone()
    with torch.no_grad(), no_forced_weight_norm(net):
        switched_off = net(x, sigma.log() / 4)
    assert torch.equal(layer.weight, before) and layer.force_normalize
    with torch.no_grad():
        forced = net(x, sigma.log() / 4)
    # the stored weight now has unit RMS per output channel; the output is the same up to the eps of the
    # normalisation (normalising a normalised weight again moves it by about eps = 1e-4 relative)
    rms = layer.weight.flatten(1).square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)
    assert (forced - switched_off).abs().max() <= 1e-3 * switched_off.abs().max()


def _lean(net, primals, tangents_, labels=None):
    with torch.no_grad(), lean_jvp(), forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents_)]
        out = forward_ad.unpack_dual(net(*duals, labels))
    return out.primal, out.tangent


def _jvp_case():
    net = _small_net()
    x, sigma = _inputs()
    generator = torch.Generator().manual_seed(9)
    dx = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    dc = torch.randn(4, generator=generator, dtype=torch.float64)
    return net, (x, sigma.log() / 4), (dx, dc), torch.tensor([1, 2, 3, 4])


def test_explicit_tangent_equals_torch_func_jvp_and_a_central_difference():
    net, primals, tangents_, labels = _jvp_case()
    with torch.no_grad():
        plain = net(*primals, labels)
        _, reference = torch.func.jvp(lambda x, c: net(x, c, labels), primals, tangents_)
    out, tangent = _lean(net, primals, tangents_, labels)
    assert reference.abs().max() > 1e-2
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, reference, rtol=1e-9, atol=1e-9)
    step = 1e-6
    with torch.no_grad():
        ahead = net(*(p + step * t for p, t in zip(primals, tangents_)), labels)
        behind = net(*(p - step * t for p, t in zip(primals, tangents_)), labels)
    torch.testing.assert_close(tangent, (ahead - behind) / (2 * step), rtol=1e-5, atol=1e-6)


def test_explicit_tangent_shares_the_dropout_mask_of_the_primal():
    net, primals, tangents_, labels = _jvp_case()
    net = _small_net(dropout=0.3).train()
    with no_forced_weight_norm(net):
        torch.manual_seed(7)
        with torch.no_grad():
            plain = net(*primals, labels)
        torch.manual_seed(7)
        with torch.no_grad():
            _, reference = torch.func.jvp(lambda x, c: net(x, c, labels), primals, tangents_)
        torch.manual_seed(7)
        out, tangent = _lean(net, primals, tangents_, labels)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("preset", ["edm2-img64-xs", "edm2-img64-s"])
def test_counted_jvp_flops_are_at_most_2_05_forwards(preset):
    # Counted on the meta device (shapes only): every conv and linear twice, attention's products three times.
    with torch.device("meta"):
        net = build_unet(preset, 64, 3).eval()
        x, c = torch.zeros(1, 3, 64, 64), torch.zeros(1)
        dx, dc = torch.ones_like(x), torch.ones(1)
    assert any(block.num_heads for block in net.unet.enc.values() if hasattr(block, "num_heads"))
    with torch.no_grad():
        forward = count_flops(lambda: net(x, c))
    lean = count_flops(lambda: _lean(net, (x, c), (dx, dc)))
    assert 2 * forward <= lean <= 2.05 * forward, lean / forward


def test_edm2_loss_is_the_uncertainty_weighted_denoising_loss():
    """L = lambda(sigma) / e^u ||D(x0 + sigma n) - x0||^2 + u dim, u = w . sqrt(2) cos(f c_noise + phi) / sqrt(128)."""
    from cmscale.models.edm2_loss import EDM2Loss

    net = _small_net()
    x0, sigma = _inputs()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        got = EDM2Loss()(EDMPrecond(net), x0, sigma, noise, labels)
        denoised = edm2_denoiser(net.state_dict(), x0 + sigma[:, None, None, None] * noise, sigma,
                                 torch.nn.functional.one_hot(labels, 10).double())
        fourier = 2**0.5 * torch.cos(sigma.log()[:, None] / 4 * net.logvar_fourier.freqs + net.logvar_fourier.phases)
        weight = net.logvar_linear.weight[0]
        u = fourier @ (weight / (1e-4 + weight.norm() / 128**0.5)) / 128**0.5
        lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        want = lam / u.exp() * (denoised - x0).square().flatten(1).sum(1) + u * x0[0].numel()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-8)


def test_dropout_res_keeps_dropout_to_the_low_resolution_blocks():
    config = RunConfig(method="edm", preset="edm2-t16", resolution=16, budget_iters=1, dropout=0.4, dropout_res=8)
    net = build_network(config, img_channels=1)
    rates = {name: block.dropout.p for name, block in [*net.unet.enc.items(), *net.unet.dec.items()]
             if hasattr(block, "dropout")}
    assert rates and all(rate == (0.4 if int(name.split("x")[0]) <= 8 else 0.0) for name, rate in rates.items())
    with pytest.raises(ValueError, match="dropout_res applies to EDM2 networks"):
        RunConfig(method="edm", preset="xxs", budget_iters=1, dropout_res=16)
