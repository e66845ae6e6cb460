"""Lean forward-mode AD: JVP rules that compute only the tangents that exist, for any network.

PyTorch's built-in forward rules waste work when the parameters carry no tangent (sCM's JVP):
- ``conv(x, W) + b`` and ``x W^T + b``: the rule convolves both tangents, ``conv(dx, W) + conv(x, dW)``,
  with ``dW`` materialised as zeros, so a JVP costs three products per layer where two suffice;
- ``group_norm``: a long chain of elementwise ops (about 60x its forward on CPU);
- ``x * s`` and ``x / s`` for a Python number s: s gets an all-zero tangent and a generic product rule.

:class:`lean_jvp` is a ``TorchFunctionMode`` that routes ``F.linear``, ``F.conv1d/2d/3d``,
``F.group_norm`` and scalar scaling (and so every ``nn.Linear``, ``nn.ConvNd`` and ``nn.GroupNorm`` of
any network built from them) to custom ``autograd.Function`` s with exact forward rules that skip absent
tangents:

    d(conv(x, W) + b) = conv(dx, W)  [+ conv(x, dW) if W has a tangent]  [+ db if b has one]

The rules are the same linear maps as PyTorch's, so results agree to rounding (the tests check the
tangent against finite differences in fp64 and against PyTorch's rule), the primal is bit-identical,
and FlopCounterMode sees exactly the products that run (two per conv/linear layer). Every other op
keeps PyTorch's rule.

Networks can go further: a module that defines ``forward_with_tangent`` (cmscale's UNet does) is
called through :func:`dual_inputs` / :func:`dual_output` and computes primal and tangent together in
plain tensors, with no dual-number bookkeeping per op (see :mod:`cmscale.models.tangents`).

The custom functions have no backward: they serve forward-mode AD under ``no_grad`` (sCM's tangent).
Where autograd must record a graph (grad enabled and an input requires grad) the mode leaves the op
alone, so wrapping a training forward in it changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.autograd import forward_ad
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from cmscale.models.tangents import normalized_tangent


def _linear_args(input, weight, bias=None):  # noqa: A002  (F.linear's own argument names)
    return input, weight, bias, ()


def _conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002
    return input, weight, bias, (stride, padding, dilation, groups)


def _layer_function(op: Callable, name: str) -> type[torch.autograd.Function]:
    """An autograd.Function computing ``op(x, W, b, *rest)`` whose forward rule skips absent tangents."""

    def forward(x, weight, bias, rest):
        return op(x, weight, bias, *rest)

    def setup_context(ctx, inputs, output):
        x, weight, _, rest = inputs
        ctx.save_for_forward(x, weight)
        # Absent tangents (the parameters') arrive as None instead of materialised zeros: the point.
        ctx.set_materialize_grads(False)
        ctx.rest = rest
        ctx.output_meta = (output.shape, output.dtype, output.device)

    def jvp(ctx, x_tangent, weight_tangent, bias_tangent, _rest_tangent):
        x, weight = ctx.saved_tensors
        tangent = None
        if x_tangent is not None:
            tangent = op(x_tangent, weight, None, *ctx.rest)
        if weight_tangent is not None:
            term = op(x, weight_tangent, None, *ctx.rest)
            tangent = term if tangent is None else tangent + term
        if bias_tangent is not None:
            # A linear bias broadcasts over the last axis; a convolution's over the channel axis.
            spatial = len(ctx.output_meta[0]) - 2
            term = bias_tangent if name == "linear" else bias_tangent.reshape(-1, *([1] * spatial))
            tangent = term.expand(ctx.output_meta[0]) if tangent is None else tangent + term
        if tangent is None:  # no input had a tangent: the output's is zero
            shape, dtype, device = ctx.output_meta
            tangent = torch.zeros(shape, dtype=dtype, device=device)
        return tangent

    def backward(ctx, grad_output):
        raise RuntimeError(f"{name} under lean_jvp() is forward-mode only; the mode leaves ops that "
                           "autograd records untouched, so this is not reached")

    return type(f"{name.title()}Tangent", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "jvp": staticmethod(jvp), "backward": staticmethod(backward),
    })


class GroupNormTangent(torch.autograd.Function):
    """``F.group_norm`` with a one-kernel forward rule (PyTorch's is a long chain of elementwise ops).

    Per group of K values, with xhat = (x - mu) rstd, the normalisation's Jacobian is
        J = rstd (I - 1 1^T / K - xhat xhat^T / K),
    which is symmetric, so the tangent J dx equals the vector-Jacobian product with dx: exactly what
    ``native_group_norm_backward`` computes in one fused pass (with no affine weight). The affine
    output gamma_c xhat + beta_c then has tangent gamma_c (J dx), plus xhat d gamma_c and d beta_c
    where the parameters carry tangents.
    """

    @staticmethod
    def forward(x, num_groups, weight, bias, eps):
        batch, channels = x.shape[:2]
        out, mean, rstd = torch.native_group_norm(x, weight, bias, batch, channels, x[0, 0].numel(), num_groups, eps)
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, num_groups, weight, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.num_groups = num_groups

    @staticmethod
    def jvp(ctx, x_tangent, _groups_tangent, weight_tangent, bias_tangent, _eps_tangent):
        x, weight, mean, rstd = ctx.saved_tensors
        batch, channels = x.shape[:2]
        groups = ctx.num_groups
        grouped = (batch, groups, -1)
        tangent = None
        if x_tangent is not None:
            tangent = normalized_tangent(x, x_tangent, mean, rstd, groups, weight)
        if weight_tangent is not None or bias_tangent is not None:
            xhat = ((x.reshape(grouped) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
            shape = (1, channels, *([1] * (x.ndim - 2)))
            terms = ([xhat * weight_tangent.reshape(shape)] if weight_tangent is not None else []) \
                + ([bias_tangent.reshape(shape).expand(x.shape)] if bias_tangent is not None else [])
            for term in terms:
                tangent = term if tangent is None else tangent + term
        if tangent is None:
            tangent = torch.zeros_like(x)
        return tangent, None, None

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("group_norm under lean_jvp() is forward-mode only; the mode leaves ops that autograd "
                           "records untouched, so this is not reached")


def _group_norm_args(input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: A002
    return input, weight, bias, (num_groups, eps)


def _apply_group_norm(x, weight, bias, rest):
    num_groups, eps = rest
    return GroupNormTangent.apply(x, num_groups, weight, bias, eps)[0]


class ScalarScaleTangent(torch.autograd.Function):
    """``x * s`` or ``x / s`` for a Python number s: tangent ``dx * s`` (or ``dx / s``), one product.

    PyTorch's rule wraps s in a tensor with an all-zero tangent and runs the product rule through
    generic decompositions (zero tensors, casts, an extra multiply and add) on every such op.
    """

    @staticmethod
    def forward(x, scalar, divide):
        return x / scalar if divide else x * scalar

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.scalar, ctx.divide = inputs
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, x_tangent, _scalar_tangent, _divide_tangent):
        if x_tangent is None:
            return None
        return x_tangent / ctx.scalar if ctx.divide else x_tangent * ctx.scalar

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("scalar scaling under lean_jvp() is forward-mode only; the mode leaves ops that autograd "
                           "records untouched, so this is not reached")


_MULTIPLY = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
_DIVIDE = (torch.div, torch.true_divide, torch.Tensor.div, torch.Tensor.true_divide, torch.Tensor.__truediv__)


def _scalar_scale(func, args, kwargs) -> tuple[torch.Tensor, float, bool] | None:
    """(x, s, divide) when ``func(*args)`` is a tensor times or over a real Python number, else None."""
    if kwargs or len(args) != 2:
        return None
    first, second = args

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if func in _MULTIPLY:
        if isinstance(first, torch.Tensor) and is_number(second):
            return first, second, False
        if isinstance(second, torch.Tensor) and is_number(first):
            return second, first, False
    if func in _DIVIDE and isinstance(first, torch.Tensor) and is_number(second):
        return first, second, True
    return None


# func -> (its arguments as (x, weight, bias, rest), the lean op taking those).
_ROUTES: dict[Callable, tuple[Callable, Callable]] = {
    F.linear: (_linear_args, _layer_function(F.linear, "linear").apply),
    F.conv1d: (_conv_args, _layer_function(F.conv1d, "conv1d").apply),
    F.conv2d: (_conv_args, _layer_function(F.conv2d, "conv2d").apply),
    F.conv3d: (_conv_args, _layer_function(F.conv3d, "conv3d").apply),
    F.group_norm: (_group_norm_args, _apply_group_norm),
}


def _records_graph(tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


_lean_depth = 0  # how many lean_jvp blocks are open: explicit tangent paths run only inside one


def dual_inputs(module: torch.nn.Module, *inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``[(primal, tangent), ...]`` of ``inputs`` when ``module`` may compute its tangent explicitly, else None.

    That is: inside :class:`lean_jvp`, with no graph to record, at least one input carrying a
    forward-mode tangent, and no parameter carrying one (a JVP in parameter space keeps the generic
    rules). Inputs without a tangent get zeros.
    """
    if _lean_depth == 0 or torch.is_grad_enabled():
        return None
    unpacked = [forward_ad.unpack_dual(tensor) for tensor in inputs]
    if all(part.tangent is None for part in unpacked):
        return None
    if any(forward_ad.unpack_dual(parameter).tangent is not None for parameter in module.parameters()):
        return None
    return [(part.primal, torch.zeros_like(part.primal) if part.tangent is None else part.tangent)
            for part in unpacked]


def dual_output(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """The dual tensor of an explicit tangent path's result, at the current dual level."""
    return forward_ad.make_dual(primal, tangent)


_plain_depth = 0  # inside an explicit tangent path: plain tensors only, so the mode passes every op through


@contextmanager
def plain_ops():
    """Let every op through :class:`lean_jvp` untouched (an explicit tangent path has no dual tensors)."""
    global _plain_depth
    _plain_depth += 1
    try:
        yield
    finally:
        _plain_depth -= 1


class lean_jvp(TorchFunctionMode):  # noqa: N801  (used like a function: ``with lean_jvp():``)
    """Inside this block, conv, linear, group-norm and scalar-scaling ops use the lean forward rules.

    Wrap a ``torch.autograd.forward_ad`` dual-level block (or a ``torch.func.jvp`` call) in it.
    """

    def __enter__(self):
        global _lean_depth
        _lean_depth += 1
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        global _lean_depth
        _lean_depth -= 1
        return super().__exit__(exc_type, exc_value, traceback)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _plain_depth:
            return func(*args, **kwargs)
        route = _ROUTES.get(func)
        if route is None:
            scaled = _scalar_scale(func, args, kwargs)
            if scaled is not None and scaled[0].is_floating_point() and not _records_graph(scaled[:1]):
                return ScalarScaleTangent.apply(*scaled)
            return func(*args, **kwargs)
        unpack, apply = route
        x, weight, bias, rest = unpack(*args, **kwargs)
        if _records_graph((x, weight, bias)):
            return func(*args, **kwargs)
        return apply(x, weight, bias, rest)
