"""Samplers (cmscale.models.samplers): the boundary condition of both parametrisations, step counts and times."""

from __future__ import annotations

import math

import pytest
import torch
from small_nets import SD, random_unet

from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond, TrigFlowPrecond
from cmscale.models.samplers import cm_sample_edm, cm_sample_trigflow, ect_times, heun_sample, scm_times


def test_cm_samplers_satisfy_the_boundary_condition_for_both_parametrisations():
    """One sampler step at t_min returns its input: f(x, t_min) = x (samplers run in float32)."""
    shape = (3, 1, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))

    ecm = EDMPrecond(random_unet(dtype=torch.float32), SD, sigma_min=0.002).eval()  # sampling: eval mode
    out, nfe = cm_sample_edm(ecm, shape, [0.002], torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, 0.002 * noise, rtol=1e-6, atol=1e-9)
    assert nfe == 1

    native = TrigFlowPrecond(random_unet(dtype=torch.float32), SD)
    out, nfe = cm_sample_trigflow(native, shape, [0.0], SD, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, SD * noise, rtol=1e-6, atol=1e-9)
    assert nfe == 1

    # A converted ECT model in TrigFlow time: t_min = arctan(sigma_min / sd) maps back to sigma_min.
    converted = EDMAsTrigFlow(ecm)
    t_min = math.atan(0.002 / SD)
    out, _ = cm_sample_trigflow(converted, shape, [t_min], SD, torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, SD * noise, rtol=1e-5, atol=1e-6)
    # ... and away from the boundary the network does act (the check above is not vacuous).
    out, _ = cm_sample_trigflow(native, shape, [1.0], SD, torch.Generator().manual_seed(5))
    assert (out - SD * noise).abs().max() > 1e-2


def test_sampler_step_counts_and_default_intermediate_times():
    net = EDMPrecond(random_unet(attention=False, dtype=torch.float32), SD)
    shape = (2, 1, 8, 8)
    assert ect_times(1) == [80.0] and ect_times(2) == [80.0, 0.821]
    assert scm_times(2)[1] == 1.1 and scm_times(1)[0] == pytest.approx(math.atan(80 / SD))
    for steps in (1, 2, 3):
        _, nfe = cm_sample_edm(net, shape, ect_times(steps), torch.Generator().manual_seed(0))
        assert nfe == steps
        _, nfe = cm_sample_trigflow(EDMAsTrigFlow(net), shape, scm_times(steps), SD, torch.Generator().manual_seed(0))
        assert nfe == steps
    for steps in (1, 4, 8):
        x, nfe = heun_sample(net, shape, steps, torch.Generator().manual_seed(0))
        assert nfe == 2 * steps - 1 and torch.isfinite(x).all()
