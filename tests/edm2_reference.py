"""EDM2's denoiser re-derived from the paper's equations, from a state dict alone (test reference).

Independent of :mod:`cmscale.models.edm2`: fp64 functional ops, resampling by 2x2 average pooling and
nearest-neighbour repetition (what EDM2's [1, 1] filter does), attention by einsum, and the network's
structure read from the state dict's keys (EDM2's names: ``unet.enc.<res>x<res>_{conv,down,blockN}``,
``unet.dec.<res>x<res>_{in0,in1,up,blockN}``; a block has attention iff it has ``attn_qkv``).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _weight(w: torch.Tensor, gain=1.0) -> torch.Tensor:
    w = w.double()
    fan_in = w[0].numel()
    norm = w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.ndim - 1)))
    return w / (1e-4 + norm / math.sqrt(fan_in)) * (gain / math.sqrt(fan_in))


def _layer(state, name, x, gain=1.0):
    w = _weight(state[name + ".weight"], gain)
    return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


def _pixel_norm(x, dim=1):
    return x / (1e-4 + x.norm(dim=dim, keepdim=True) / math.sqrt(x.shape[dim]))


def _silu(x):
    return F.silu(x) / 0.596


def _sum(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)


def _block(state, prefix, x, emb, flavor, head_channels=64):
    has = lambda name: f"{prefix}.{name}.weight" in state  # noqa: E731
    if prefix.endswith("_down"):
        x = F.avg_pool2d(x, 2)
    elif prefix.endswith("_up"):
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if flavor == "enc":
        if has("conv_skip"):
            x = _layer(state, f"{prefix}.conv_skip", x)
        x = _pixel_norm(x)
    y = _layer(state, f"{prefix}.conv_res0", _silu(x))
    scale = _layer(state, f"{prefix}.emb_linear", emb, gain=state[f"{prefix}.emb_gain"].double()) + 1
    y = _layer(state, f"{prefix}.conv_res1", _silu(y * scale[:, :, None, None]))
    if flavor == "dec" and has("conv_skip"):
        x = _layer(state, f"{prefix}.conv_skip", x)
    x = _sum(x, y, 0.3)
    if has("attn_qkv"):
        n, c, h, w = x.shape
        heads = c // head_channels
        qkv = _layer(state, f"{prefix}.attn_qkv", x).reshape(n, heads, c // heads, 3, h * w)
        q, k, v = _pixel_norm(qkv, dim=2).unbind(3)
        attn = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(c // heads)).softmax(dim=3)
        y = _layer(state, f"{prefix}.attn_proj", torch.einsum("nhqk,nhck->nhcq", attn, v).reshape(n, c, h, w))
        x = _sum(x, y, 0.3)
    return x.clamp(-256, 256)


def _names(state, part):
    seen = []
    for key in state:
        if key.startswith(f"unet.{part}."):
            name = key.split(".")[2]
            if name not in seen:
                seen.append(name)
    return seen


def edm2_denoiser(state, x, sigma, labels=None, sigma_data=0.5, head_channels=64):
    """D(x; sigma, labels) in fp64 from EDM2's Precond state dict; labels one-hot [N, label_dim] or None."""
    state = {key: value.double() for key, value in state.items()}
    x, sigma = x.double(), torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (s**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    fourier = math.sqrt(2) * torch.cos(c_noise[:, None] * state["unet.emb_fourier.freqs"]
                                       + state["unet.emb_fourier.phases"])
    emb = _layer(state, "unet.emb_noise", fourier)
    if "unet.emb_label.weight" in state:
        label_dim = state["unet.emb_label.weight"].shape[1]
        labels = torch.zeros(x.shape[0], label_dim, dtype=torch.float64) if labels is None else labels.double()
        emb = _sum(emb, _layer(state, "unet.emb_label", labels * math.sqrt(label_dim)), 0.5)
    emb = _silu(emb)
    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for name in _names(state, "enc"):
        if name.endswith("_conv"):
            h = _layer(state, f"unet.enc.{name}", h)
        else:
            h = _block(state, f"unet.enc.{name}", h, emb, "enc", head_channels)
        skips.append(h)
    for name in _names(state, "dec"):
        if "block" in name:
            skip = skips.pop()
            n_a, n_b = h.shape[1], skip.shape[1]
            c = math.sqrt((n_a + n_b) / 0.5)
            h = torch.cat([h * (c * 0.5 / math.sqrt(n_a)), skip * (c * 0.5 / math.sqrt(n_b))], dim=1)
        h = _block(state, f"unet.dec.{name}", h, emb, "dec", head_channels)
    out = _layer(state, "unet.out_conv", h, gain=state["unet.out_gain"])
    return c_skip * x + c_out * out
