"""EDM's exact DDPM++ and ADM networks: EDM's state-dict layout, the layer equations, JVP and FLOPs."""

import math

import pytest
import torch
from edm_format import ddpmpp_reference

from cmscale.models.edm_networks import Conv2d, DhariwalUNet, Linear, SongUNet, UNetBlock
from cmscale.models.flops import count_flops, forward_flops, meta_copy
from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond
from cmscale.models.presets import build_unet
from cmscale.models.unet import count_parameters

TINY = dict(model_channels=8, channel_mult=(2, 2, 2), num_blocks=2, attn_resolutions=(8,))


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # EDM zero-initialises output convs; random weights make every layer matter in a comparison.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)
    return net


def test_ddpmpp_preset_has_edm_cifar10_keys_shapes_and_parameter_count():
    net = meta_copy(lambda: build_unet("ddpmpp", 32, 3))
    state = net.state_dict()
    # Keys and shapes of EDM's CIFAR-10 network (NVlabs/edm SongUNet, model_channels 128, mult [2,2,2], augment_dim 9).
    expected_shapes = {
        "map_augment.weight": (128, 9),
        "map_layer0.weight": (512, 128),
        "map_layer1.weight": (512, 512),
        "enc.32x32_conv.weight": (128, 3, 3, 3),
        "enc.32x32_block0.conv0.weight": (256, 128, 3, 3),
        "enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "enc.16x16_block3.qkv.weight": (768, 256, 1, 1),
        "enc.8x8_block0.affine.weight": (256, 512),
        "dec.8x8_in0.proj.weight": (256, 256, 1, 1),
        "dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "dec.16x16_block4.norm2.weight": (256,),
        "dec.32x32_block0.conv0.weight": (256, 512, 3, 3),
        "dec.32x32_aux_norm.weight": (256,),
        "dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # Attention only where DDPM++ has it: each 16x16 encoder block, the last 16x16 decoder block, the bottleneck's in0.
    attention = sorted(key[: -len(".qkv.weight")] for key in state if key.endswith(".qkv.weight"))
    assert attention == ["dec.16x16_block4", "dec.8x8_in0", *[f"enc.16x16_block{i}" for i in range(4)]]
    assert not any(".qkv." in key for key in state if key.startswith("dec.16x16_block") and "block4" not in key)
    assert count_parameters(net) == 55_733_891  # 55.73M; EDM's CIFAR-10 network (1,152 of them in map_augment)
    assert len(state) == 425


def test_ddpmpp_forward_matches_the_layer_equations_at_a_tiny_width():
    torch.manual_seed(0)
    net = _randomised(SongUNet(16, 1, **TINY).double()).eval()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    c_noise = torch.tensor([-1.0, 0.2, 1.1], dtype=torch.float64)
    reference = ddpmpp_reference(net.state_dict(), x, c_noise, **TINY)
    assert torch.allclose(net(x, c_noise), reference, rtol=1e-10, atol=1e-10)


def test_state_dict_in_edm_layout_loads_strictly_into_a_fresh_network():
    source = _randomised(SongUNet(16, 3, **TINY, augment_dim=9))
    edm_layout = {f"model.{key}": value for key, value in source.state_dict().items()}  # EDMPrecond's keys
    target = SongUNet(16, 3, **TINY, augment_dim=9)
    target.load_state_dict({key.removeprefix("model."): value for key, value in edm_layout.items()}, strict=True)
    x, c_noise = torch.randn(2, 3, 16, 16), torch.randn(2)
    assert torch.equal(source.eval()(x, c_noise), target.eval()(x, c_noise))


def test_attention_uses_edm_qkv_channel_interleaving():
    # EDM splits qkv output channels as [head][channel][q, k, v]: channel 3c is q_c, 3c + 1 is k_c, 3c + 2 is v_c.
    block = UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=1).double()
    _randomised(block)
    h = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    qkv = block.qkv(block.norm2(h)).reshape(1, 8, 3, 16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=2)
    expected = (v @ weights.transpose(1, 2)).reshape(h.shape)
    assert torch.allclose(block.attend(h), expected, atol=1e-12)


@pytest.mark.parametrize("network", ["ddpmpp", "adm"])
def test_jvp_through_edm_networks_matches_a_central_finite_difference(network):
    torch.manual_seed(1)
    if network == "ddpmpp":
        net = SongUNet(16, 1, **TINY)
    else:
        net = DhariwalUNet(16, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))
    model = EDMAsTrigFlow(EDMPrecond(_randomised(net).double().eval()))
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([0.7, -0.3], dtype=torch.float64)
    _, tangent = torch.func.jvp(model.F, (x, t), (dx, dt))
    step = 1e-6
    difference = (model.F(x + step * dx, t + step * dt) - model.F(x - step * dx, t - step * dt)) / (2 * step)
    assert torch.allclose(tangent, difference, rtol=1e-6, atol=1e-7)


def _hand_count(net: torch.nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-adds of every conv, resampling filter, linear layer and attention product, from layer shapes."""
    total = 0
    handles = []

    def conv_hook(module: Conv2d, inputs, output):
        nonlocal total
        batch, _, height, width = output.shape
        if module.up or module.down:
            # A depthwise 2x2 filter: 4 multiply-adds per channel and per pixel of the coarse grid
            # (the output when downsampling, the input when upsampling by a transposed conv).
            coarse = height * width // 4 if module.up else height * width
            total += 2 * batch * module.in_channels * 4 * coarse
        if module.weight is not None:
            out_channels, in_channels, k, _ = module.weight.shape
            total += 2 * batch * out_channels * in_channels * k * k * height * width

    def linear_hook(module: Linear, inputs, output):
        nonlocal total
        total += 2 * output.shape[0] * module.in_features * module.out_features

    def block_hook(module: UNetBlock, inputs, output):
        nonlocal total
        if module.num_heads:
            batch, channels, height, width = output.shape
            total += 2 * (2 * batch * channels * (height * width) ** 2)  # q^T k and v w^T

    for module in net.modules():
        if isinstance(module, Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, UNetBlock):
            handles.append(module.register_forward_hook(block_hook))
    with torch.no_grad():
        net(x, torch.zeros(x.shape[0]))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("network", ["ddpmpp", "adm"])
def test_counted_forward_flops_equal_the_hand_count_from_layer_shapes(network):
    if network == "ddpmpp":
        net = SongUNet(16, 1, **TINY, augment_dim=9)
    else:
        net = DhariwalUNet(16, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))
    x = torch.zeros(2, 1, 16, 16)
    assert forward_flops(net, batch_size=2) == _hand_count(net, x) > 0
    # and the training step of the online network is forward + 2 x forward (grads of inputs and weights)
    with torch.device("meta"):
        meta_net, meta_x = SongUNet(16, 1, **TINY), torch.zeros(2, 1, 16, 16)
    step = count_flops(lambda: meta_net(meta_x, torch.zeros(2, device="meta")).sum().backward())
    assert 2.5 * forward_flops(meta_net, 2) < step <= 3 * forward_flops(meta_net, 2)
