"""One attention function for every network: fused SDPA where it can run, plain matmuls where it cannot.

``attention(q, k, v)`` computes ``softmax(q k^T / sqrt(d)) v`` on ``(batch, heads, tokens, d)``
tensors. It uses ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient /
cuDNN kernels on CUDA, a fused kernel on CPU) unless one of these holds, in which case it uses two
matmuls and a softmax:

- a tensor carries a forward-mode tangent, which is what ``torch.func.jvp`` (sCM's tangent) and
  ``torch.autograd.forward_ad`` make: the fused kernels have no forward-mode AD formula. The check
  is on the tensors themselves, so every JVP through any network that calls ``attention`` gets the
  matmul path without a flag to remember, and every other pass (EDM, ECT's online and target
  passes, sCM's graded and teacher forwards, sampling) gets SDPA;
- the block runs inside :func:`matmul_attention`, the explicit override. FLOP counting uses it,
  because ``FlopCounterMode`` counts no FLOPs for the CPU SDPA kernel; both paths do the same
  multiply-adds, so counts agree with what runs on any device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.autograd import forward_ad
from torch.nn import functional as F

_matmul_depth = 0


@contextmanager
def matmul_attention() -> Iterator[None]:
    """Force the plain-matmul path for every ``attention`` call in the block (nests)."""
    global _matmul_depth
    _matmul_depth += 1
    try:
        yield
    finally:
        _matmul_depth -= 1


def has_tangent(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` carries a forward-mode AD tangent (inside ``torch.func.jvp`` or a dual level)."""
    return forward_ad.unpack_dual(tensor).tangent is not None


def uses_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``attention(q, k, v)`` takes the matmul path (see the module docstring)."""
    return _matmul_depth > 0 or has_tangent(q) or has_tangent(k) or has_tangent(v)


def matmul_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in plain ops, differentiable in forward and reverse mode."""
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights.to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over ``(batch, heads, tokens, d)``: SDPA, or matmuls under forward AD."""
    if uses_matmul(q, k, v):
        return matmul_attention_fn(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
