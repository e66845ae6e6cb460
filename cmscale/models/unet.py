"""An EDM / DDPM++-style UNet with one size knob, used for every method in cmscale.

The network is a plain ``nn.Module`` that maps ``(x, c_noise) -> F``; preconditioning (EDM or
TrigFlow) wraps it (see ``precond.py``). The noise label ``c_noise`` is a float per sample:
``ln(sigma)/4`` under EDM and ``t`` under TrigFlow; both feed the same positional embedding.

Attention goes through :func:`cmscale.models.attention.attention`: fused SDPA on every pass, and
plain matmuls inside a JVP (sCM's tangent), since the fused kernels have no forward-mode AD.

Inside :class:`cmscale.models.jvp.lean_jvp`, a call with dual inputs (sCM's tangent) goes through
``forward_with_tangent``: every block computes its output and the output's tangent together in plain
tensors (:mod:`cmscale.models.tangents`), which costs about two forwards where dual-number AD costs
nearly three.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cmscale.models import tangents
from cmscale.models.attention import attention
from cmscale.models.dropout import ReplayableDropout
from cmscale.models.jvp import dual_inputs, dual_output, plain_ops


def _group_count(channels: int) -> int:
    # At most 32 groups (the DDPM++ default) of at least 4 channels, and it must divide evenly.
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar noise label (the DDPM++/EDM 'positional' variant)."""

    def __init__(self, num_channels: int, max_positions: int = 10_000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def frequencies(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        # fp32 at least, even under autocast; fp64 passes through for finite-difference checks.
        dtype = torch.float64 if c_noise.dtype == torch.float64 else torch.float32
        freqs = torch.arange(half, dtype=dtype, device=c_noise.device) / max(half - 1, 1)
        return (1.0 / self.max_positions) ** freqs

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        freqs = self.frequencies(c_noise)
        angles = c_noise.to(freqs.dtype)[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    def forward_with_tangent(self, c_noise: torch.Tensor, dc_noise: torch.Tensor) -> tangents.Pair:
        freqs = self.frequencies(c_noise)
        return tangents.positional_embedding(c_noise.to(freqs.dtype), dc_noise.to(freqs.dtype), freqs)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with an adaptive scale/shift from the noise embedding."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float):
        super().__init__()
        self.norm_in = nn.GroupNorm(_group_count(in_channels), in_channels, eps=1e-6)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.norm_out = nn.GroupNorm(_group_count(out_channels), out_channels, eps=1e-6)
        self.dropout = ReplayableDropout(dropout)  # ECT replays the online pass's masks in its target
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        # A near-zero last conv makes each block start as the identity, as in EDM's init.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm_out(h), scale + 1))
        h = self.conv_out(self.dropout(h))
        residual = x if self.skip is None else self.skip(x)
        return (h + residual) / math.sqrt(2)

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor, emb: torch.Tensor,
                             demb: torch.Tensor) -> tangents.Pair:
        h, dh = tangents.conv(self.conv_in, *tangents.silu(*tangents.group_norm(self.norm_in, x, dx)))
        scale_shift, dscale_shift = tangents.linear(self.emb_proj, emb, demb)
        scale, shift = scale_shift[:, :, None, None].chunk(2, dim=1)
        dscale, dshift = dscale_shift[:, :, None, None].chunk(2, dim=1)
        # gamma of norm_out folds into the per-channel factor of its tangent: d(normed) = gamma J dh.
        normed, dnormed = tangents.group_norm(self.norm_out, h, dh, affine_tangent=False)
        scale = scale + 1
        gamma = 1 if self.norm_out.weight is None else self.norm_out.weight[:, None, None]
        h = torch.addcmul(shift, normed, scale)
        dh = torch.addcmul(dshift, dnormed, scale * gamma).addcmul_(normed, dscale)
        h, dh = tangents.silu(h, dh)
        mask = self.dropout(torch.ones_like(h)) if self.training and self.dropout.p > 0 else None
        if mask is not None:  # the same mask on primal and tangent, drawn as the plain forward draws it
            h, dh = h * mask, dh * mask
        h, dh = tangents.conv(self.conv_out, h, dh)
        residual, dresidual = (x, dx) if self.skip is None else tangents.conv(self.skip, x, dx)
        return tangents.scaled_sum(h, residual, 1 / math.sqrt(2)), tangents.scaled_sum(dh, dresidual, 1 / math.sqrt(2))


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels (SDPA, or matmuls under forward-mode AD; see ``attention``)."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(_group_count(channels), channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        head_channels = channels // self.num_heads
        # qkv's channels are ordered (head, q/k/v, channel); tokens go last so that a channels_last
        # input gives q, k, v with unit stride along the head channels, as the fused kernels want.
        qkv = self.qkv(self.norm(x)).reshape(batch, self.num_heads, 3, head_channels, height * width)
        q, k, v = qkv.transpose(-2, -1).unbind(2)
        attended = attention(q, k, v).transpose(-2, -1).reshape(batch, channels, height, width)
        return (x + self.proj(attended)) / math.sqrt(2)

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor) -> tangents.Pair:
        batch, channels, height, width = x.shape
        head_channels = channels // self.num_heads
        heads = (batch, self.num_heads, 3, head_channels, height * width)
        qkv, dqkv = tangents.conv(self.qkv, *tangents.group_norm(self.norm, x, dx))
        q, k, v = qkv.reshape(heads).transpose(-2, -1).unbind(2)
        dq, dk, dv = dqkv.reshape(heads).transpose(-2, -1).unbind(2)
        attended, dattended = tangents.attention(q, k, v, dq, dk, dv)
        out, dout = tangents.conv(self.proj, attended.transpose(-2, -1).reshape(x.shape),
                                  dattended.transpose(-2, -1).reshape(x.shape))
        return tangents.scaled_sum(x, out, 1 / math.sqrt(2)), tangents.scaled_sum(dx, dout, 1 / math.sqrt(2))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor) -> tangents.Pair:
        return tangents.conv(self.conv, x, dx)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor) -> tangents.Pair:
        return tangents.conv(self.conv, F.interpolate(x, scale_factor=2, mode="nearest"),
                             F.interpolate(dx, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """DDPM++-style UNet: ``forward(x, c_noise) -> tensor of x's shape``.

    Args:
        img_resolution: input height and width (a power of two times ``2**(len(channel_mult)-1)``).
        img_channels: image channels in and out.
        model_channels: base channel count; level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: channel multiplier per resolution level.
        num_blocks: residual blocks per level (the decoder has one more, as in DDPM++).
        attn_resolutions: resolutions (in pixels) that get a self-attention layer after each block.
        dropout: dropout probability inside residual blocks (ECT tunes with 0.2 on CIFAR-10).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        model_channels: int,
        channel_mult: tuple[int, ...],
        num_blocks: int,
        attn_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
    ):
        super().__init__()
        if img_resolution % (2 ** (len(channel_mult) - 1)) != 0:
            raise ValueError(
                f"img_resolution={img_resolution} is not divisible by 2**{len(channel_mult) - 1} "
                f"(channel_mult={channel_mult} has {len(channel_mult)} levels); pick a resolution "
                "that is a multiple of that or fewer levels"
            )
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        emb_channels = 4 * model_channels
        self.noise_embedding = PositionalEmbedding(model_channels)
        self.emb_mlp = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.conv_in = nn.Conv2d(img_channels, model_channels, 3, padding=1)

        self.encoder = nn.ModuleList()
        skip_channels = [model_channels]
        channels = model_channels
        resolution = img_resolution
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.encoder.append(Downsample(channels))
                resolution //= 2
                skip_channels.append(channels)
            for _ in range(num_blocks):
                out_channels = model_channels * mult
                self.encoder.append(ResBlock(channels, out_channels, emb_channels, dropout))
                channels = out_channels
                if resolution in attn_resolutions:
                    self.encoder.append(SelfAttention(channels))
                skip_channels.append(channels)

        self.middle = nn.ModuleList(
            [
                ResBlock(channels, channels, emb_channels, dropout),
                SelfAttention(channels),
                ResBlock(channels, channels, emb_channels, dropout),
            ]
        )

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                out_channels = model_channels * mult
                self.decoder.append(ResBlock(channels + skip_channels.pop(), out_channels, emb_channels, dropout))
                channels = out_channels
                if resolution in attn_resolutions:
                    self.decoder.append(SelfAttention(channels))
            if level > 0:
                self.decoder.append(Upsample(channels))
                resolution *= 2

        self.norm_out = nn.GroupNorm(_group_count(channels), channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        dual = dual_inputs(self, x, c_noise)
        if dual is not None:  # sCM's tangent inside lean_jvp: the explicit path
            with plain_ops():
                primal, tangent = self.forward_with_tangent(*dual[0], *dual[1])
            return dual_output(primal, tangent)
        emb = self.emb_mlp(self.noise_embedding(c_noise.reshape(-1).expand(x.shape[0])))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.encoder:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            if not isinstance(layer, SelfAttention):
                skips.append(h)
            else:
                skips[-1] = h
        for layer in self.middle:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.decoder:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor, c_noise: torch.Tensor,
                             dc_noise: torch.Tensor) -> tangents.Pair:
        """(F, dF) for an input tangent (dx, dc_noise): the same layers as :meth:`forward`, each with its rule."""
        batch = x.shape[0]
        emb, demb = self.noise_embedding.forward_with_tangent(c_noise.reshape(-1).expand(batch),
                                                              dc_noise.reshape(-1).expand(batch))
        first, _, second = self.emb_mlp  # Linear, SiLU, Linear
        emb, demb = tangents.linear(second, *tangents.silu(*tangents.linear(first, emb, demb)))
        h, dh = tangents.conv(self.conv_in, x, dx)
        skips = [(h, dh)]
        for layer in self.encoder:
            h, dh = layer.forward_with_tangent(h, dh, emb, demb) if isinstance(layer, ResBlock) \
                else layer.forward_with_tangent(h, dh)
            if not isinstance(layer, SelfAttention):
                skips.append((h, dh))
            else:
                skips[-1] = (h, dh)
        for layer in self.middle:
            h, dh = layer.forward_with_tangent(h, dh, emb, demb) if isinstance(layer, ResBlock) \
                else layer.forward_with_tangent(h, dh)
        for layer in self.decoder:
            if isinstance(layer, ResBlock):
                skip, dskip = skips.pop()
                h, dh = layer.forward_with_tangent(torch.cat([h, skip], dim=1), torch.cat([dh, dskip], dim=1),
                                                   emb, demb)
            else:
                h, dh = layer.forward_with_tangent(h, dh)
        return tangents.conv(self.conv_out, *tangents.silu(*tangents.group_norm(self.norm_out, h, dh)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
