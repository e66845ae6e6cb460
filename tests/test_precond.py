"""Preconditioners (cmscale.models.precond) against their equations: the EDM->TrigFlow map, ECT's ECMPrecond."""

from __future__ import annotations

import pytest
import torch
from small_nets import SD, images, random_unet, relative_error

from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond, edm_sigma, trigflow_time


@pytest.mark.parametrize("sigma_min", [0.0, 0.003])  # plain EDM (closed-form F) and ECT's ECMPrecond
def test_edm_to_trigflow_round_trips_the_denoiser_output(sigma_min):
    """D(x, sigma) -> sd F(x_t/sd, t) -> cos t x_t - sin t sd F = D again, with sigma = sd tan t."""
    edm = EDMPrecond(random_unet(), SD, sigma_min=sigma_min).eval()  # eval: the shift applies
    trig = EDMAsTrigFlow(edm)
    x_sigma = images(6) + torch.randn(6, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    with torch.no_grad():
        denoised = edm(x_sigma, sigma)
        t = trigflow_time(sigma, SD)
        cos_t, sin_t = t.cos().view(-1, 1, 1, 1), t.sin().view(-1, 1, 1, 1)
        x_t = cos_t * x_sigma
        F = trig.F(x_t / SD, t)
        rebuilt = cos_t * x_t - sin_t * SD * F
        via_f = trig(x_t, t)
    torch.testing.assert_close(rebuilt, denoised, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_f, denoised, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(edm_sigma(t, SD), sigma, rtol=1e-12, atol=0)
    # F predicts the scaled velocity: for a perfect denoiser (D = x0), sd F = cos t z - sin t x0.
    assert denoised.abs().max() > 0.1  # a non-trivial network, not an identity map


def test_ecm_precond_reduces_to_edm_away_from_the_boundary_and_is_exact_at_it():
    net = random_unet()
    x = images(3)
    with torch.no_grad():
        plain = EDMPrecond(net, SD)(x, torch.full((3,), 20.0, dtype=torch.float64))
        shifted = EDMPrecond(net, SD, sigma_min=0.002).eval()(x, torch.full((3,), 20.0, dtype=torch.float64))
        boundary = EDMPrecond(net, SD, sigma_min=0.002).eval()(x, torch.full((3,), 0.002, dtype=torch.float64))
    assert relative_error(shifted, plain) < 1e-3
    torch.testing.assert_close(boundary, x, rtol=0, atol=1e-12)
