"""EDM's exact network layouts: DDPM++ (``SongUNet``) and ADM (``DhariwalUNet``), written for cmscale.

These reproduce the architectures of Karras et al. 2022 (EDM, ``training/networks.py`` of NVlabs/edm)
with the *same parameter names and shapes*, so that the state dict of the ``model`` inside EDM's
``EDMPrecond`` loads with ``load_state_dict(strict=True)`` and no renaming (keys such as
``enc.32x32_conv.weight``, ``dec.16x16_block3.qkv.weight``, ``map_layer0.bias``). At the CIFAR-10
configuration (``model_channels=128, channel_mult=(2, 2, 2)``, 4 blocks, attention at 16x16) the
DDPM++ network has 55.73M parameters (55,733,891 with EDM's 9-dimensional augmentation label).

Both networks take ``forward(x, c_noise)`` like :class:`cmscale.models.unet.UNet`; ``c_noise`` is
EDM's noise label ln(sigma)/4 (or TrigFlow's t), so cmscale's preconditioners wrap them unchanged.

The layer equations (B = batch, C = channels; silu(x) = x sigmoid(x)):

- ``Conv2d``: optional resampling with the separable box filter f = [1, 1] (outer product,
  normalised to sum 1) -- downsampling is a depthwise stride-2 conv with f (2x2 average pooling),
  upsampling a depthwise stride-2 transposed conv with 4f (nearest neighbour) -- then a k x k conv.
- ``UNetBlock``: h = conv0(silu(norm0(x))); e = affine(emb);
  DDPM++ (no adaptive scale): h = silu(norm1(h + e));  ADM: h = silu(norm1(h) (1 + e_scale) + e_shift);
  h = conv1(dropout(h)); x = (h + skip(x)) * skip_scale, with skip a 1x1 conv (or a bare resampling)
  when shapes change; with attention: q, k, v = qkv(norm2(x)) split per head with EDM's channel
  interleaving [head][channel][q|k|v], W = softmax(q^T k / sqrt(C_head)) over keys,
  x = (proj(v W^T) + x) * skip_scale.
- Noise embedding: sinusoids of c_noise with frequencies (1/10^4)^(i/(C/2 - 1)) (DDPM++: 'endpoint',
  order [sin, cos]) or (1/10^4)^(i/(C/2)) (ADM: order [cos, sin]), then two linear layers.

Everything is built from ``F.conv2d``/``F.linear`` on explicit parameters and attention from plain
matmuls, so ``torch.func.jvp`` (sCD's tangent) and ``FlopCounterMode`` see ordinary ops. Dropout is
:class:`~cmscale.models.dropout.ReplayableDropout`, so ECT can replay the online pass's masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cmscale.models.dropout import ReplayableDropout
from cmscale.models.labels import label_vector

# EDM's weight initialisations (fan-in/fan-out scaled); only fresh networks use them.


def _init_weight(shape: tuple[int, ...], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}; use xavier_uniform, kaiming_uniform or kaiming_normal")


class Linear(nn.Module):
    """y = x W^T + b, with parameters ``weight`` [out, in] and ``bias`` [out] as in EDM."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init_weight((out_features, in_features), **fans) * init_weight)
        self.bias = nn.Parameter(_init_weight((out_features,), **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Module):
    """Optional 2x up/downsampling by a separable filter, then a ``kernel`` x ``kernel`` conv (0: none).

    The filter is the buffer ``resample_filter`` (registered, as None, even when unused, so that the
    state-dict keys match EDM's). EDM's 'fused' resampling (NCSN++ only) is not needed here.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: tuple[int, ...] = (1, 1),
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (
            nn.Parameter(_init_weight((out_channels, in_channels, kernel, kernel), **fans) * init_weight)
            if kernel
            else None
        )
        self.bias = nn.Parameter(_init_weight((out_channels,), **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        box = torch.outer(taps, taps)[None, None] / taps.sum() ** 2
        self.register_buffer("resample_filter", box if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            filt = self.resample_filter.to(x.dtype)
            pad = (filt.shape[-1] - 1) // 2
            channels = x.shape[1]
            if self.up:
                x = F.conv_transpose2d(x, (4 * filt).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=pad)
            else:
                x = F.conv2d(x, filt.tile(channels, 1, 1, 1), groups=channels, stride=2, padding=pad)
        if self.weight is not None:
            x = F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        if self.bias is not None:
            # Added outside the conv: the conv's own bias gradient is measurably slower on CPU (oneDNN).
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C / 4) groups, as in EDM."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        if num_channels % self.num_groups:
            raise ValueError(
                f"{num_channels} channels do not split into {self.num_groups} groups; "
                "use a channel count divisible by min(32, channels // 4)"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """EDM's residual block (optionally resampling) with optional self-attention; names as in EDM."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: tuple[int, ...] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0.0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = (
            0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        )
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.drop = ReplayableDropout(dropout)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when channels change (or DDPM++'s resample_proj); else a bare resampling.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init
            )
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        residual = x
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.drop(h))
        x = (h + (self.skip(residual) if self.skip is not None else residual)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self.attend(x)) + x) * self.skip_scale
        return x

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        heads = self.num_heads
        # EDM's channel layout of the qkv conv: [head][channel within head][q, k, v].
        q, k, v = self.qkv(self.norm2(x)).reshape(batch * heads, channels // heads, 3, -1).unbind(2)
        # Softmax weights in fp32 at least (as EDM's AttentionOp), plain matmuls for forward-mode AD.
        dtype = torch.promote_types(q.dtype, torch.float32)
        logits = torch.einsum("ncq,nck->nqk", q.to(dtype), k.to(dtype)) / math.sqrt(k.shape[1])
        weights = torch.softmax(logits, dim=2).to(q.dtype)
        return torch.einsum("nqk,nck->ncq", weights, v).reshape(x.shape)


class PositionalEmbedding(nn.Module):
    """Sinusoids of the noise label; ``endpoint`` puts the last frequency at exactly 1/max_positions."""

    def __init__(self, num_channels: int, max_positions: int = 10_000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        # fp32 at least, even under autocast; fp64 passes through for finite-difference checks.
        dtype = torch.float64 if c_noise.dtype == torch.float64 else torch.float32
        exponents = torch.arange(half, dtype=dtype, device=c_noise.device) / (half - (1 if self.endpoint else 0))
        angles = torch.outer(c_noise.to(dtype), (1 / self.max_positions) ** exponents)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def _check_levels(img_resolution: int, channel_mult: tuple[int, ...]) -> None:
    if img_resolution % (2 ** (len(channel_mult) - 1)) != 0:
        raise ValueError(
            f"img_resolution={img_resolution} is not divisible by 2**{len(channel_mult) - 1} "
            f"(channel_mult={tuple(channel_mult)} has {len(channel_mult)} levels); pick a resolution "
            "that is a multiple of that or fewer levels"
        )


class SongUNet(nn.Module):
    """DDPM++ (Song et al. 2021) as configured in EDM: ``forward(x, c_noise) -> F`` with EDM's parameter names.

    Only the DDPM++ variant is built (positional embedding, 'standard' encoder and decoder, box
    filter [1, 1]); EDM's NCSN++ options are not. ``label_dim > 0`` adds EDM's class-label layer
    ``map_label`` (class-conditional EDM pickles); labels go through :func:`~cmscale.models.labels.label_vector`.

    Args:
        img_resolution, img_channels: image size and channels (in and out).
        model_channels: base width; level i has ``model_channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level (EDM CIFAR-10: (2, 2, 2)).
        channel_mult_emb: embedding width as a multiple of ``model_channels`` (4).
        num_blocks: residual blocks per encoder level (the decoder has one more per level).
        attn_resolutions: resolutions with single-head attention: after every encoder block there,
            and after the last decoder block of that level (plus the bottleneck's first block).
        dropout: dropout probability inside the blocks (EDM: 0.13; ECT tunes with 0.2).
        augment_dim: width of EDM's augmentation label (9 in EDM's CIFAR-10 runs; the layer
            ``map_augment`` exists so the state dict loads, and is unused without augmentation labels).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.0,
        augment_dim: int = 0,
        label_dim: int = 0,
    ):
        super().__init__()
        _check_levels(img_resolution, channel_mult)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=(1, 1),
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        channels = img_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(channels, model_channels, 3, **init)
                channels = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(channels, channels, down=True, **block)
            for index in range(num_blocks):
                out = model_channels * mult
                self.enc[f"{res}x{res}_block{index}"] = UNetBlock(
                    channels, out, attention=res in attn_resolutions, **block
                )
                channels = out
        skips = [module.out_channels for module in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(channels, channels, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(channels, channels, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(channels, channels, up=True, **block)
            for index in range(num_blocks + 1):
                out = model_channels * mult
                attention = index == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{index}"] = UNetBlock(
                    channels + skips.pop(), out, attention=attention, **block
                )
                channels = out
        res = img_resolution
        self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(channels, eps=1e-6)
        self.dec[f"{res}x{res}_aux_conv"] = Conv2d(channels, img_channels, 3, **init_zero)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.map_noise(c_noise.reshape(-1).expand(x.shape[0]))
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1).to(x.dtype)  # DDPM++ orders the sinusoids [sin, cos]
        if self.map_label is not None:
            emb = emb + self.map_label(label_vector(class_labels, self.label_dim, x.shape[0], emb)
                                       * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        out = None
        for name, module in self.dec.items():
            if name.endswith("_aux_norm"):
                out = module(x)
            elif name.endswith("_aux_conv"):
                out = module(F.silu(out))
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal and Nichol 2021) as configured in EDM, unconditional, with EDM's parameter names.

    EDM's ImageNet-64 configuration: ``model_channels=192, channel_mult=(1, 2, 3, 4)``, 3 blocks,
    attention (64 channels per head) at 32, 16 and 8. ``label_dim > 0`` adds EDM's ``map_label``
    (bias-free, added to the embedding before its last SiLU), as in EDM's conditional ImageNet-64 network.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        model_channels: int = 192,
        channel_mult: tuple[int, ...] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: tuple[int, ...] = (32, 16, 8),
        dropout: float = 0.0,
        augment_dim: int = 0,
        label_dim: int = 0,
    ):
        super().__init__()
        _check_levels(img_resolution, channel_mult)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        self.enc = nn.ModuleDict()
        channels = img_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(channels, model_channels * mult, 3, **init)
                channels = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(channels, channels, down=True, **block)
            for index in range(num_blocks):
                out = model_channels * mult
                self.enc[f"{res}x{res}_block{index}"] = UNetBlock(
                    channels, out, attention=res in attn_resolutions, **block
                )
                channels = out
        skips = [module.out_channels for module in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(channels, channels, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(channels, channels, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(channels, channels, up=True, **block)
            for index in range(num_blocks + 1):
                out = model_channels * mult
                self.dec[f"{res}x{res}_block{index}"] = UNetBlock(
                    channels + skips.pop(), out, attention=res in attn_resolutions, **block
                )
                channels = out
        self.out_norm = GroupNorm(channels)
        self.out_conv = Conv2d(channels, img_channels, 3, **init_zero)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.map_noise(c_noise.reshape(-1).expand(x.shape[0])).to(x.dtype)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(label_vector(class_labels, self.label_dim, x.shape[0], emb))
        emb = F.silu(emb)
        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        for name, module in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
