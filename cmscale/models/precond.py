"""Preconditioners: EDM (Karras et al. 2022) and TrigFlow (Lu & Song 2024), with the exact map between them.

EDM denoiser:   D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
                c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
                c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
ECT's boundary-exact variant (ECMPrecond of locuslab/ect) shifts sigma by sigma_min in c_skip and
c_out, c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2),
so that D(x, sigma_min) = x exactly. The official code shifts only in eval mode (the EMA model when
sampling and computing FID); in training mode, for the online and the target pass, it is the plain
EDM preconditioner. ``boundary_shift`` names when the shift applies: "eval" (official), "always", "off".

TrigFlow:       x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2];
                consistency function f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t).
Map:            sigma = sd tan(t) and x_t = cos(t) x_sigma, so an EDM denoiser D gives
                sd F(x_t / sd, t) = (cos(t) x_t - D(x_t / cos t, sd tan t)) / sin(t), and then f = D.
                For the plain EDM preconditioner this is exactly F = -net(x_t / sd, ln(sd tan t) / 4).
"""

from __future__ import annotations

import torch
from torch import nn

from cmscale.models.unet import UNet


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample value, shaped to broadcast against a batch like ``like``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1).expand(like.shape[0]).reshape(-1, *([1] * (like.ndim - 1)))


def call_net(net: nn.Module, x: torch.Tensor, c_noise: torch.Tensor,
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """``net(x, c_noise)``, with ``class_labels`` passed only when given (unconditional networks take none)."""
    if class_labels is None:
        return net(x, c_noise)
    return net(x, c_noise, class_labels)


BOUNDARY_SHIFT_MODES = ("eval", "always", "off")


class EDMPrecond(nn.Module):
    """EDM denoiser around a UNet; ``sigma_min > 0`` gives ECT's boundary-exact ECMPrecond.

    Args:
        sigma_min: the boundary shift (locuslab/ect's ECMPrecond uses 0.003); 0 is plain EDM.
        boundary_shift: when the shift applies. "eval" (the official ECMPrecond and FastGen): only in
            eval mode, so training (online and target pass) sees the plain EDM c_skip and c_out, and
            the student starts as exactly its teacher; "always": in both modes; "off": never.
    """

    def __init__(self, net: UNet, sigma_data: float = 0.5, sigma_min: float = 0.0, boundary_shift: str = "eval"):
        super().__init__()
        if boundary_shift not in BOUNDARY_SHIFT_MODES:
            raise ValueError(f"boundary_shift must be one of {BOUNDARY_SHIFT_MODES}, got {boundary_shift!r}")
        self.net = net
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.boundary_shift = boundary_shift

    def active_sigma_min(self) -> float:
        """The shift in effect now: sigma_min, or 0 where the mode (and train/eval state) turns it off."""
        if self.boundary_shift == "always" or (self.boundary_shift == "eval" and not self.training):
            return self.sigma_min
        return 0.0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma), with ``class_labels`` passed to a class-conditional network (EDM2's) when given."""
        sigma = _per_sample(sigma, x)
        sd = self.sigma_data
        shifted = sigma - self.active_sigma_min()
        c_skip = sd**2 / (shifted**2 + sd**2)
        c_out = shifted * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log().reshape(-1) / 4
        return c_skip * x + c_out * call_net(self.net, c_in * x, c_noise, class_labels)


class TrigFlowPrecond(nn.Module):
    """A native TrigFlow network (``c_noise = t``): ``F`` predicts the scaled velocity."""

    def __init__(self, net: UNet, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def F(self, x_scaled: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return call_net(self.net, x_scaled, t.reshape(-1), class_labels)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = _per_sample(t, x_t)
        return t.cos() * x_t - t.sin() * self.sigma_data * self.F(x_t / self.sigma_data, t, class_labels)


class EDMAsTrigFlow(nn.Module):
    """The TrigFlow view of an EDM denoiser (exact): one teacher serves ECT and sCD."""

    def __init__(self, edm: EDMPrecond):
        super().__init__()
        self.edm = edm
        self.sigma_data = edm.sigma_data

    def F(self, x_scaled: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = _per_sample(t, x_scaled)
        sd = self.sigma_data
        if self.edm.active_sigma_min() == 0:
            # With sigma = sd tan t: c_skip = cos^2 t, c_out = sd sin t and c_in x_sigma = x_t / sd, so
            # sd F = (cos t x_t - D) / sin t = -sd net(x_t / sd, ln(sigma) / 4) exactly. Evaluating it
            # this way avoids the cancellation in cos t x_t - D near t = 0 and x_t / cos t near pi/2.
            return -call_net(self.edm.net, x_scaled, (sd * t.tan()).log().reshape(-1) / 4, class_labels)
        x_t = sd * x_scaled
        denoised = self.edm(x_t / t.cos(), sd * t.tan(), class_labels)
        return (t.cos() * x_t - denoised) / (sd * t.sin())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = _per_sample(t, x_t)
        return t.cos() * x_t - t.sin() * self.sigma_data * self.F(x_t / self.sigma_data, t, class_labels)


def trigflow_time(sigma: torch.Tensor | float, sigma_data: float = 0.5) -> torch.Tensor:
    return torch.atan(torch.as_tensor(sigma) / sigma_data)


def edm_sigma(t: torch.Tensor | float, sigma_data: float = 0.5) -> torch.Tensor:
    return sigma_data * torch.tan(torch.as_tensor(t))


def network_of(model: nn.Module) -> nn.Module:
    """The network inside any preconditioner (through EDMAsTrigFlow's converted EDM wrapper)."""
    if isinstance(model, EDMAsTrigFlow):
        model = model.edm
    return model.net
