"""Samplers: consistency-model n-step sampling (EDM and TrigFlow time) and EDM's Heun sampler.

Every sampler returns ``(images, nfe)``: the number of network evaluations per image.
Noise comes from a ``torch.Generator`` so an eval is reproducible from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ECT_SIGMA_MAX = 80.0
ECT_SIGMA_MID = 0.821  # ECT's CIFAR-10 two-step intermediate sigma
SCM_T_MID = 1.1  # sCM's two-step intermediate TrigFlow time


def ect_times(steps: int, sigma_max: float = ECT_SIGMA_MAX, sigma_mid: float = ECT_SIGMA_MID) -> list[float]:
    """Noise levels (EDM sigma) of an n-step CM sampler: sigma_max, then sigma_mid, then geometric down."""
    if steps == 1:
        return [sigma_max]
    tail = [sigma_mid * (0.002 / sigma_mid) ** (i / max(steps - 1, 1)) for i in range(steps - 1)]
    return [sigma_max, *tail]


def scm_times(steps: int, sigma_data: float = 0.5, sigma_max: float = ECT_SIGMA_MAX,
              t_mid: float = SCM_T_MID) -> list[float]:
    """TrigFlow times of an n-step sCM sampler: arctan(sigma_max/sd), then t_mid, then evenly down."""
    t_max = math.atan(sigma_max / sigma_data)
    if steps == 1:
        return [t_max]
    return [t_max, *[t_mid * (1 - i / (steps - 1)) + 0.05 * (i / (steps - 1)) for i in range(steps - 1)]]


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator,
                       device=generator.device if generator is not None else device).to(device)


@torch.no_grad()
def cm_sample_edm(model, shape: Sequence[int], sigmas: Sequence[float], generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """x = f(sigma_0 z, sigma_0); then for each later sigma: x = f(x + sigma z', sigma)."""
    device = torch.device(device)
    x = model(sigmas[0] * _randn(shape, generator, device), torch.full((shape[0],), sigmas[0], device=device))
    for sigma in sigmas[1:]:
        noisy = x + sigma * _randn(shape, generator, device)
        x = model(noisy, torch.full((shape[0],), sigma, device=device))
    return x, len(sigmas)


@torch.no_grad()
def cm_sample_trigflow(model, shape: Sequence[int], times: Sequence[float], sigma_data: float = 0.5,
                       generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """x = f(sd z, t_0); then x = f(cos t x + sin t sd z', t) for each later t."""
    device = torch.device(device)
    x = model(sigma_data * _randn(shape, generator, device), torch.full((shape[0],), times[0], device=device))
    for t in times[1:]:
        noisy = math.cos(t) * x + math.sin(t) * sigma_data * _randn(shape, generator, device)
        x = model(noisy, torch.full((shape[0],), t, device=device))
    return x, len(times)


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(denoiser, shape: Sequence[int], steps: int = 18, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> tuple[torch.Tensor, int]:
    """EDM's deterministic 2nd-order Heun sampler on the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma. NFE = 2N - 1."""
    device = torch.device(device)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).tolist()
    x = sigmas[0] * _randn(shape, generator, device)
    nfe = 0
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        slope = (x - denoiser(x, torch.full((shape[0],), sigma, device=device))) / sigma
        nfe += 1
        x_next = x + (sigma_next - sigma) * slope
        if i < steps - 1:
            slope_next = (x_next - denoiser(x_next, torch.full((shape[0],), sigma_next, device=device))) / sigma_next
            nfe += 1
            x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
        x = x_next
    return x, nfe
