"""Primal and tangent together, in plain tensors: the layers of an explicit JVP.

Forward-mode AD through dual tensors pays bookkeeping on every op (unpacking, zero tangents for
absent inputs, generic product rules). For cmscale's UNet the tangent is a short list of rules, so
:meth:`cmscale.models.unet.UNet.forward_with_tangent` applies them directly, each returning
``(y, dy)`` for an input ``(x, dx)``; the parameters carry no tangent (sCM differentiates in input
space). Every rule is the exact derivative, checked against PyTorch's forward-mode AD and finite
differences in fp64 (tests/test_jvp.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

Pair = tuple[torch.Tensor, torch.Tensor]


def conv(layer: nn.Conv2d, x: torch.Tensor, dx: torch.Tensor) -> Pair:
    """d conv(x, W) + b = conv(dx, W): one product for the tangent, none for the absent dW."""
    return layer(x), F.conv2d(dx, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def linear(layer: nn.Linear, x: torch.Tensor, dx: torch.Tensor) -> Pair:
    return layer(x), F.linear(dx, layer.weight)


def silu(x: torch.Tensor, dx: torch.Tensor) -> Pair:
    """d silu(x) = silu'(x) dx, one fused kernel (the gradient kernel computes the same product)."""
    return F.silu(x), torch.ops.aten.silu_backward(dx, x)


def group_norm(layer: nn.GroupNorm, x: torch.Tensor, dx: torch.Tensor, affine_tangent: bool = True) -> Pair:
    """d(gamma xhat + beta) = gamma J dx with J the normalisation's Jacobian.

    J = rstd (I - 1 1^T / K - xhat xhat^T / K) per group of K values is symmetric, so J dx is the
    vector-Jacobian product that ``native_group_norm_backward`` computes in one fused pass.
    ``affine_tangent=False`` returns J dx, for a caller that folds gamma into its own per-channel
    product (one pass over the activation fewer).
    """
    batch, channels = x.shape[:2]
    y, mean, rstd = torch.native_group_norm(x, layer.weight, layer.bias, batch, channels, x[0, 0].numel(),
                                            layer.num_groups, layer.eps)
    return y, normalized_tangent(x, dx, mean, rstd, layer.num_groups, layer.weight if affine_tangent else None)


def normalized_tangent(x: torch.Tensor, dx: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """gamma J dx (J dx without ``weight``), J the group normalisation's Jacobian at x (see :func:`group_norm`)."""
    batch, channels = x.shape[:2]
    dy = torch.ops.aten.native_group_norm_backward(dx, x, mean, rstd, None, batch, channels, x[0, 0].numel(),
                                                   num_groups, [True, False, False])[0]
    if weight is not None:
        dy = dy.mul_(weight.reshape(1, channels, *([1] * (x.ndim - 2))))
    return dy


def positional_embedding(c: torch.Tensor, dc: torch.Tensor, freqs: torch.Tensor) -> Pair:
    """[cos(c f), sin(c f)] and its tangent [-sin(c f) f dc, cos(c f) f dc]."""
    angles, dangles = c[:, None] * freqs[None, :], dc[:, None] * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, sin], dim=1), torch.cat([-sin * dangles, cos * dangles], dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> Pair:
    """o = P v with P = softmax(q k^T / sqrt d), and do = dP v + P dv, where
    dP = P * (dS - rowsum(P * dS)) and dS = (dq k^T + q dk^T) / sqrt d."""
    scale = 1 / math.sqrt(q.shape[-1])
    weights = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
    d_scores = (dq @ k.transpose(-2, -1)).add_(q @ dk.transpose(-2, -1)).mul_(scale)
    d_weights = weights * (d_scores - (weights * d_scores).sum(dim=-1, keepdim=True))
    return weights @ v, (d_weights @ v).add_(weights @ dv)


def scaled_sum(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """(a + b) * scale in two passes and one allocation (the residual joins of the UNet)."""
    return torch.add(a, b).mul_(scale)
