"""EDM2's magnitude-preserving UNet (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models"), written from the paper's equations with EDM2's module and parameter names, so
that the state dict of a published EDM2 ``Precond`` loads strictly into :class:`EDM2Net`.

Every layer keeps activations at unit magnitude in expectation (the paper's equation numbers):

- weights: forced weight normalisation (eq. 66): in training mode each forward first rescales the
  stored weight to unit norm per output channel, ``w <- w / (eps + ||w|| / sqrt(fan_in))``, and the
  layer always uses the normalised weight times ``gain / sqrt(fan_in)`` (eq. 47). ECT's target pass
  must not rescale in place (``no_forced_weight_norm``);
- ``mp_silu(x) = silu(x) / 0.596`` (eq. 81); ``mp_sum(a, b, t) = ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)``
  (eq. 88); ``mp_cat`` scales the two parts so the concatenation keeps unit magnitude (eq. 103);
- pixel norm ``x / (eps + ||x||_channels / sqrt(C))`` in place of group norm; cosine attention: the
  same normalisation of q, k and v per head before the dot products;
- Fourier features ``sqrt(2) cos(2 pi (f c + phi))`` with fixed random f, phi (eq. 75) for the noise
  label (and, in :class:`EDM2Net`, for the log-variance head ``u(sigma)`` of eq. 21);
- the class label (one-hot, times sqrt(label_dim)) is mapped by its own MPConv and joined to the
  noise embedding with ``mp_sum``; the network output has a learned gain that starts at 0.

The UNet maps ``(x, c_noise, class_labels) -> F``; cmscale's :class:`~cmscale.models.precond.EDMPrecond`
wraps it with EDM's c_skip, c_out, c_in and c_noise = ln(sigma)/4, which are EDM2's.

Inside :class:`cmscale.models.jvp.lean_jvp`, a call with dual inputs (sCM's tangent) goes through
``forward_with_tangent``: each operation with its exact tangent rule, in plain tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cmscale.models import tangents
from cmscale.models.dropout import ReplayableDropout
from cmscale.models.jvp import dual_inputs, dual_output, plain_ops
from cmscale.models.labels import label_vector

Pair = tangents.Pair
MP_SILU_SCALE = 0.596  # E[silu(x)^2]^(1/2) for x ~ N(0, 1)


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 compute norms and the Fourier features in fp32, as EDM2 does; fp64 (the tests) stays fp64
    return torch.promote_types(dtype, torch.float32)


def _norm_dims(x: torch.Tensor, dim: int | Sequence[int] | None) -> list[int]:
    if dim is None:
        return list(range(1, x.ndim))
    return [dim] if isinstance(dim, int) else list(dim)


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| / sqrt(n)) over ``dim`` (all but the first by default), n the number of reduced values."""
    return x / _norm_divisor(x, dim, eps).to(x.dtype)


def _norm_divisor(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """eps + ||x|| / sqrt(n) over ``dim``, kept as size-1 dimensions (at least fp32)."""
    norm = torch.linalg.vector_norm(x, dim=_norm_dims(x, dim), keepdim=True, dtype=_at_least_fp32(x.dtype))
    return torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))  # one op (and one autograd node)


def normalize_with_tangent(x: torch.Tensor, dx: torch.Tensor, dim: int, eps: float = 1e-4) -> Pair:
    """y = x / s with s = eps + a ||x||, a = 1/sqrt(n):  dy = dx / s - x a <x, dx> / (||x|| s^2)."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    a = 1 / math.sqrt(x.shape[dim])
    s = norm * a + eps
    inner = (x * dx).sum(dim=dim, keepdim=True)
    coef = inner * a / (norm.clamp_min(torch.finfo(x.dtype).tiny) * s * s)
    return x / s, dx / s - x * coef


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / MP_SILU_SCALE


def mp_silu_with_tangent(x: torch.Tensor, dx: torch.Tensor) -> Pair:
    y, dy = tangents.silu(x, dx)
    return y / MP_SILU_SCALE, dy / MP_SILU_SCALE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): a weighted sum that keeps unit magnitude."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def _mp_sum_weights(t: float) -> tuple[float, float]:
    """(w_a, w_b) with mp_sum(a, b, t) = w_a a + w_b b."""
    norm = math.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / norm, t / norm


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """[w_a a, w_b b], w_a = C (1 - t) / sqrt(N_a), w_b = C t / sqrt(N_b), C^2 = (N_a + N_b) / ((1 - t)^2 + t^2)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(n_a)), b * (c * t / math.sqrt(n_b))], dim=dim)


def resample(x: torch.Tensor, kernel: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down (a depthwise blur with stride 2) or up (its transpose, times 4), or ``keep``; linear in x."""
    if mode == "keep":
        return x
    if list(kernel) == [1, 1] and mode in ("down", "up"):
        # EDM2's box filter: 2x2 means down, nearest-neighbour copies up (the same maps as the convolutions
        # below, counted as no FLOPs); the copies as one broadcast, faster than F.interpolate's kernel
        if mode == "down":
            return F.avg_pool2d(x, 2)
        n, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
    taps = np.asarray(kernel, dtype=np.float32)
    if taps.ndim != 1 or len(taps) % 2:
        raise ValueError(f"resample_filter must be a 1-D filter of even length, got {list(kernel)}")
    taps = taps / taps.sum()
    channels = x.shape[1]
    weight = torch.as_tensor(np.outer(taps, taps), dtype=x.dtype, device=x.device)
    weight = weight[None, None].expand(channels, 1, *weight.shape)
    pad = (len(taps) - 1) // 2
    if mode == "down":
        return F.conv2d(x, weight, groups=channels, stride=2, padding=pad)
    if mode != "up":
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    return F.conv_transpose2d(x, weight * 4, groups=channels, stride=2, padding=pad)


class MPFourier(nn.Module):
    """sqrt(2) cos(freqs c + phases), freqs ~ 2 pi N(0, bandwidth^2), phases ~ 2 pi U(0, 1); both fixed buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        dtype = _at_least_fp32(c.dtype)
        angles = torch.outer(c.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (angles.cos() * math.sqrt(2)).to(c.dtype)

    def forward_with_tangent(self, c: torch.Tensor, dc: torch.Tensor) -> Pair:
        angles = torch.outer(c, self.freqs.to(c.dtype)) + self.phases.to(c.dtype)
        dangles = torch.outer(dc, self.freqs.to(c.dtype))
        return angles.cos() * math.sqrt(2), angles.sin().mul_(-math.sqrt(2)) * dangles


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel`` (k, k)) or linear layer (``kernel`` ()), eq. 47,
    with forced weight normalisation in training mode (eq. 66) unless ``force_normalize`` is False."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.force_normalize = True
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain: float | torch.Tensor = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer applies: normalised, times gain / sqrt(fan_in). Renormalises the stored weight
        first in training mode (forced weight normalisation)."""
        weight = self.weight.to(_at_least_fp32(self.weight.dtype))
        if self.training and self.force_normalize:
            with torch.no_grad():
                if weight is self.weight:  # fp32/fp64: in place, and ``weight`` is the renormalised one
                    self.weight.div_(_norm_divisor(weight))
                else:  # a low-precision store: EDM2 normalises the fp32 copy taken before the update
                    self.weight.copy_(normalize(weight))
        # gain / (sqrt(fan_in) ||w||) per output channel first (a small tensor), then one pass over the weight
        scale = gain / math.sqrt(weight[0].numel()) / _norm_divisor(weight)
        return (weight * scale).to(dtype or weight.dtype)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 2:
            return x @ weight.t()
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        return self.apply_weight(x, self.effective_weight(gain, x.dtype))

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor, gain: float | torch.Tensor = 1.0) -> Pair:
        weight = self.effective_weight(gain, x.dtype)
        return self.apply_weight(x, weight), self.apply_weight(dx, weight)


@contextmanager
def no_forced_weight_norm(net: nn.Module) -> Iterator[None]:
    """Within the block, no MPConv of ``net`` renormalises its stored weight in place (ECT's target pass)."""
    layers = [module for module in net.modules() if isinstance(module, MPConv)]
    saved = [layer.force_normalize for layer in layers]
    for layer in layers:
        layer.force_normalize = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.force_normalize = value


class Block(nn.Module):
    """An encoder ('enc') or decoder ('dec') block of the EDM2 UNet (the paper's figure 21): resample,
    (enc: 1x1 conv to the new width and pixel norm), residual branch with the embedding's per-channel
    scale, mp_sum join, optional cosine self-attention, clipping."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"block flavor must be 'enc' or 'dec', got {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.dropout = ReplayableDropout(dropout)  # a module without state: the state dict is EDM2's
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def _split_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        # EDM2's channel layout: (head, channel within head, q/k/v); pixels last.
        return qkv.reshape(qkv.shape[0], self.num_heads, -1, 3, qkv.shape[2] * qkv.shape[3])

    def _dropout_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.training and self.dropout.p > 0:
            return self.dropout(torch.ones_like(like))
        return None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The constant factors of mp_silu and mp_sum that meet a convolution are folded into its gain (they
        # scale the small weight instead of the activations): the same maps as mp_silu and mp_sum, with
        # fewer passes over the activations, forward and backward.
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(F.silu(x), gain=1 / MP_SILU_SCALE)
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = F.silu(y * scale[:, :, None, None].to(y.dtype))
        main, branch = _mp_sum_weights(self.res_balance)
        y = self.conv_res1(self.dropout(y), gain=branch / MP_SILU_SCALE)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = torch.add(y, x, alpha=main)  # mp_sum(x, y, res_balance)
        if self.num_heads:
            q, k, v = normalize(self._split_heads(self.attn_qkv(x)), dim=2).unbind(3)
            # softmax over keys of q^T k / sqrt(c), per head; heads (n, h, c, pixels)
            weights = (q.transpose(2, 3) @ (k / math.sqrt(q.shape[2]))).softmax(dim=3)
            y = (v @ weights.transpose(2, 3)).reshape(x.shape)
            main, branch = _mp_sum_weights(self.attn_balance)
            x = torch.add(self.attn_proj(y, gain=branch), x, alpha=main)  # mp_sum(x, attn_proj(y), attn_balance)
        if self.clip_act is not None:
            x = x.clamp_(-self.clip_act, self.clip_act)  # in place: x is the fresh output of mp_sum
        return x

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor, emb: torch.Tensor, demb: torch.Tensor) -> Pair:
        x, dx = resample(x, self.resample_filter, self.resample_mode), resample(dx, self.resample_filter,
                                                                               self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x, dx = self.conv_skip.forward_with_tangent(x, dx)
            x, dx = normalize_with_tangent(x, dx, dim=1)
        y, dy = self.conv_res0.forward_with_tangent(*mp_silu_with_tangent(x, dx))
        scale, dscale = self.emb_linear.forward_with_tangent(emb, demb, gain=self.emb_gain)
        scale, dscale = (scale + 1)[:, :, None, None], dscale[:, :, None, None]
        y, dy = mp_silu_with_tangent(y * scale, torch.addcmul(dy * scale, y, dscale))
        mask = self._dropout_mask(y)
        if mask is not None:  # one mask for primal and tangent, drawn as the plain forward draws it
            y, dy = y * mask, dy * mask
        y, dy = self.conv_res1.forward_with_tangent(y, dy)
        if self.flavor == "dec" and self.conv_skip is not None:
            x, dx = self.conv_skip.forward_with_tangent(x, dx)
        x, dx = mp_sum(x, y, t=self.res_balance), mp_sum(dx, dy, t=self.res_balance)
        if self.num_heads:
            qkv, dqkv = self.attn_qkv.forward_with_tangent(x, dx)
            qkv, dqkv = normalize_with_tangent(self._split_heads(qkv), self._split_heads(dqkv), dim=2)
            (q, k, v), (dq, dk, dv) = qkv.unbind(3), dqkv.unbind(3)
            y, dy = tangents.attention(*(part.transpose(2, 3) for part in (q, k, v, dq, dk, dv)))
            y, dy = self.attn_proj.forward_with_tangent(y.transpose(2, 3).reshape(x.shape),
                                                        dy.transpose(2, 3).reshape(x.shape))
            x, dx = mp_sum(x, y, t=self.attn_balance), mp_sum(dx, dy, t=self.attn_balance)
        if self.clip_act is not None:
            inside = x.abs() < self.clip_act
            x, dx = x.clamp(-self.clip_act, self.clip_act), dx * inside
        return x, dx


class EDM2UNet(nn.Module):
    """EDM2's UNet: ``forward(x, c_noise, class_labels=None) -> F`` (the paper's figure 21).

    ``class_labels``: one-hot (or soft) ``[N, label_dim]`` floats, or int class indices ``[N]``;
    None is the all-zero label (EDM2's convention for a conditional network called without labels).
    ``dropout_res``: apply ``dropout`` only in blocks at resolutions <= this (ECT's ImageNet-64 option);
    None applies it everywhere, as EDM2 does.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, dropout_res: int | None = None,
                 **block_kwargs):
        super().__init__()
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(the EDM2 UNet halves it {len(channel_mult) - 1} times)")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        widths = [model_channels * mult for mult in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=())
        self.emb_label = MPConv(label_dim, emb_channels, kernel=()) if label_dim else None
        dropout = block_kwargs.pop("dropout", 0.0)

        def block(in_channels: int, out_channels: int, res: int, **kwargs) -> Block:
            rate = dropout if dropout_res is None or res <= dropout_res else 0.0
            return Block(in_channels, out_channels, emb_channels, dropout=rate, **kwargs, **block_kwargs)

        self.enc = nn.ModuleDict()
        width = img_channels + 1  # the input gets a constant-one channel (a bias the MPConv lacks)
        skip_widths = []  # every encoder layer's output feeds one decoder block
        for level, channels in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(width, channels, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = block(width, width, res, flavor="enc", resample_mode="down")
            width = channels if level == 0 else width
            skip_widths.append(width)
            for index in range(num_blocks):
                self.enc[f"{res}x{res}_block{index}"] = block(width, channels, res, flavor="enc",
                                                              attention=res in attn_resolutions)
                width = channels
                skip_widths.append(width)
        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = block(width, width, res, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(width, width, res, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(width, width, res, flavor="dec", resample_mode="up")
            for index in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{index}"] = block(width + skip_widths.pop(), channels, res, flavor="dec",
                                                              attention=res in attn_resolutions)
                width = channels
        self.out_conv = MPConv(width, img_channels, kernel=(3, 3))

    def embedding(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(c_noise.reshape(-1).expand(batch)))
        if self.emb_label is not None:
            labels = label_vector(class_labels, self.label_dim, batch, emb)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        dual = dual_inputs(self, x, c_noise)
        if dual is not None:  # sCM's tangent inside lean_jvp: the explicit path
            with plain_ops():
                primal, tangent = self.forward_with_tangent(*dual[0], *dual[1], class_labels=class_labels)
            return dual_output(primal, tangent)
        emb = self.embedding(c_noise, class_labels, x.shape[0])
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor, c_noise: torch.Tensor, dc_noise: torch.Tensor,
                             class_labels: torch.Tensor | None = None) -> Pair:
        """(F, dF) for an input tangent (dx, dc_noise); labels carry none."""
        batch = x.shape[0]
        emb, demb = self.emb_fourier.forward_with_tangent(c_noise.reshape(-1).expand(batch),
                                                          dc_noise.reshape(-1).expand(batch))
        emb, demb = self.emb_noise.forward_with_tangent(emb, demb)
        if self.emb_label is not None:
            labels = label_vector(class_labels, self.label_dim, batch, emb)
            label_emb = self.emb_label(labels * math.sqrt(labels.shape[1]))
            emb, demb = mp_sum(emb, label_emb, t=self.label_balance), demb * ((1 - self.label_balance) / math.sqrt(
                (1 - self.label_balance) ** 2 + self.label_balance**2))
        emb, demb = mp_silu_with_tangent(emb, demb)
        x, dx = torch.cat([x, torch.ones_like(x[:, :1])], dim=1), torch.cat([dx, torch.zeros_like(dx[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x, dx = layer.forward_with_tangent(x, dx) if name.endswith("_conv") \
                else layer.forward_with_tangent(x, dx, emb, demb)
            skips.append((x, dx))
        for name, layer in self.dec.items():
            if "block" in name:
                skip, dskip = skips.pop()
                x, dx = mp_cat(x, skip, t=self.concat_balance), mp_cat(dx, dskip, t=self.concat_balance)
            x, dx = layer.forward_with_tangent(x, dx, emb, demb)
        return self.out_conv.forward_with_tangent(x, dx, gain=self.out_gain)


class EDM2Net(nn.Module):
    """EDM2's ``Precond`` without the preconditioning: the UNet and the log-variance head u(sigma) (eq. 21).

    Its state dict is exactly that of EDM2's ``training.networks_edm2.Precond`` (``unet.*``,
    ``logvar_fourier.*``, ``logvar_linear.weight``), so a published network loads strictly.
    ``forward(x, c_noise, class_labels=None) -> F`` as every cmscale network; cmscale's
    :class:`~cmscale.models.precond.EDMPrecond` applies c_skip, c_out, c_in and c_noise = ln(sigma)/4,
    which are EDM2's. ``use_fp16`` and ``sigma_data`` are kept as EDM2 records them (metadata).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                             **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=())

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, c_noise, class_labels)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """u(sigma) per sample, [N]: the learned log-variance of the loss at noise label c_noise."""
        return self.logvar_linear(self.logvar_fourier(c_noise.reshape(-1))).reshape(-1)
