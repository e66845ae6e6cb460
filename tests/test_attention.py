"""The attention switch: SDPA on ordinary passes, plain matmuls under forward-mode AD, same numbers.

The reference is the einsum attention the UNet used before SDPA, so old checkpoints keep their
meaning; the JVP through the UNet (matmul path) is checked against a central finite difference of
the SDPA path.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import forward_ad

from cmscale.models.attention import attention, matmul_attention, uses_matmul
from cmscale.models.flops import count_flops, forward_flops
from cmscale.models.presets import build_unet
from cmscale.models.unet import SelfAttention, UNet


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-zero weights (the zero-initialised projections would hide attention entirely)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 1.0 / math.sqrt(parameter[0].numel()))
            elif "norm" not in name:
                parameter.normal_(0, 0.1)
    return module


def einsum_attention(layer: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """SelfAttention.forward as written before the SDPA switch (channels ordered head, q/k/v, channel)."""
    batch, channels, height, width = x.shape
    qkv = layer.qkv(layer.norm(x)).reshape(batch * layer.num_heads, 3, channels // layer.num_heads, height * width)
    q, k, v = qkv.unbind(1)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(q.shape[1]), dim=2)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(batch, channels, height, width)
    return (x + layer.proj(attended)) / math.sqrt(2)


def small_unet(seed: int = 0) -> UNet:
    net = UNet(img_resolution=8, img_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,))
    return randomize(net, seed)


def test_both_paths_equal_the_einsum_reference_with_several_heads():
    layer = randomize(SelfAttention(128, head_channels=32), seed=0)  # 4 heads
    x = torch.randn(3, 128, 4, 4, generator=torch.Generator().manual_seed(1))
    reference = einsum_attention(layer, x)
    with torch.no_grad():
        fused = layer(x)
        with matmul_attention():
            plain = layer(x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_unet_outputs_and_gradients_agree_between_sdpa_and_matmul(memory_format):
    net = small_unet(seed=2).to(memory_format=memory_format)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)).to(memory_format=memory_format)
    c_noise = torch.linspace(-1, 1, 4)

    def output_and_grads():
        net.zero_grad()
        out = net(x, c_noise)
        (out**2).sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    fused_out, fused_grads = output_and_grads()
    with matmul_attention():
        plain_out, plain_grads = output_and_grads()
    assert fused_out.abs().max() > 0.1
    torch.testing.assert_close(fused_out, plain_out, atol=1e-5, rtol=1e-4)
    for fused, plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_forward_ad_takes_the_matmul_path_and_ordinary_passes_take_sdpa():
    q = torch.randn(2, 2, 16, 8)
    seen = {}

    def probe(tensor):
        seen["jvp"] = uses_matmul(tensor, tensor, tensor)
        return attention(tensor, tensor, tensor)

    torch.func.jvp(probe, (q,), (torch.ones_like(q),))  # SDPA here would raise: no forward-AD formula
    assert seen["jvp"] is True
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(q, torch.ones_like(q))
        assert uses_matmul(dual, q, q)
        attention(dual, q, q)
    assert not uses_matmul(q, q, q)
    with matmul_attention():
        assert uses_matmul(q, q, q)
    assert not uses_matmul(q, q, q)


def test_unet_jvp_matches_a_central_finite_difference_of_the_sdpa_forward():
    net = small_unet(seed=4).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    c_noise = torch.tensor([-0.5, 0.0, 0.7], dtype=torch.float64)
    v_x = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    v_c = torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        _, tangent = torch.func.jvp(net, (x, c_noise), (v_x, v_c))
        eps = 1e-6
        central = (net(x + eps * v_x, c_noise + eps * v_c) - net(x - eps * v_x, c_noise - eps * v_c)) / (2 * eps)
    assert central.abs().max() > 1e-2
    assert float((tangent - central).norm() / central.norm()) < 1e-6


def test_flop_counts_do_not_depend_on_the_attention_path_or_the_device():
    # count_flops counts attention as its matmuls, so a CPU count (where FlopCounterMode sees no
    # FLOPs in the SDPA kernel) equals the meta-device count, and equals 2 * 2 * B * L^2 * C per layer.
    with torch.device("meta"):
        meta_net = build_unet("s", 16, 1)
    cpu_net = build_unet("s", 16, 1)
    assert forward_flops(cpu_net, batch_size=2) == forward_flops(meta_net, batch_size=2)
    layer = SelfAttention(64)
    x = torch.zeros(2, 64, 8, 8)
    convs = 2 * 2 * 64 * 64 * (3 + 1) * 64
    assert count_flops(lambda: layer(x)) == convs + 2 * 2 * 2 * 64**2 * 64
