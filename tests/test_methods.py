"""Methods against their equations: preconditioners, the EDM->TrigFlow map, ECT, sCM, samplers, FLOPs.

Networks here get random (non-zero) weights, since the UNet's zero-initialised output layers would
make F = 0 and hide errors in the maps. Checks that need tight tolerances run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from cmscale.config import RunConfig
from cmscale.methods import (
    RECIPES,
    TeacherCheckpointError,
    build_method,
    network_of,
    recipe_of,
    sampler_steps,
    with_sampler_steps,
)
from cmscale.models.losses import ECTLoss, EDMLoss, SCMLoss
from cmscale.models.precond import (
    EDMAsTrigFlow,
    EDMPrecond,
    TrigFlowPrecond,
    edm_sigma,
    trigflow_time,
)
from cmscale.models.presets import build_unet
from cmscale.models.samplers import (
    cm_sample_edm,
    cm_sample_trigflow,
    ect_times,
    heun_sample,
    scm_times,
)
from cmscale.models.unet import UNet

SD = 0.5


def random_unet(
    seed: int = 0, dtype: torch.dtype = torch.float64, attention: bool = True, dropout: float = 0.0
) -> UNet:
    """A small UNet (with attention at 4x4) whose every weight is random, so F is far from zero."""
    torch.manual_seed(seed)
    net = UNet(
        img_resolution=8,
        img_channels=1,
        model_channels=8,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(4,) if attention else (),
        dropout=dropout,
    )
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 1.0 / math.sqrt(parameter[0].numel()))
            elif "norm" not in name:
                parameter.normal_(0, 0.1)
    return net.to(dtype)


def images(batch: int = 4, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, 8, 8, generator=generator) * 2 - 1).to(dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# Preconditioners and the EDM <-> TrigFlow map


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


# ---------------------------------------------------------------------------------------------
# ECT


def test_ect_loss_at_r_zero_equals_the_edm_loss_up_to_the_documented_weighting():
    """At r = 0 the target is x0, so d = EDMLoss / lambda(t) and ECT = w(t, 0) (sqrt(d + c^2) - c)."""
    model = EDMPrecond(random_unet(), SD, sigma_min=0.0)
    x0 = images(5)
    noise = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0.01, 0.1, 0.5, 1.0, 1.9], dtype=torch.float64)  # all below ln(k - 1) = 1.95
    edm = EDMLoss(sigma_data=SD)
    edm_loss = edm(model, x0, sigma=t, noise=noise)
    for c, weighting in [(0.0, "inv_dt"), (0.03, "inv_dt"), (0.0, "snr")]:
        ect = ECTLoss(sigma_data=SD, q=2.0, c=c, weighting=weighting)
        assert (ect.t_to_r(t) == 0).all()  # stage 0 of the sigmoid mapping
        ect_loss = ect(model, x0, t=t, noise=noise)
        torch.testing.assert_close(ect_loss, ect.from_diffusion_loss(edm_loss, t, edm.weight(t)), rtol=1e-5, atol=0)
    # The CIFAR-10 form spelled out: sqrt(d) / t with d = EDMLoss / lambda.
    plain = ECTLoss(sigma_data=SD)(model, x0, t=t, noise=noise)
    torch.testing.assert_close(plain, (edm_loss / edm.weight(t)).sqrt() / t, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mapping", ["sigmoid", "const"])
def test_ect_mapping_halves_the_gap_per_stage_and_never_goes_negative(mapping):
    loss = ECTLoss(q=2.0, k=8.0, b=1.0, mapping=mapping, iters_per_stage=100)
    t = torch.logspace(-4, 3, 500, dtype=torch.float64)
    previous_gap = None
    for stage in range(10):
        loss.set_iteration(stage * 100 + 37)
        assert loss.stage == stage
        r = loss.t_to_r(t)
        assert (r >= 0).all() and (r < t).all()
        gap = (t - r) / t
        if previous_gap is not None:
            unclamped = (previous_gap < 1) & (gap < 1)  # r > 0 in both stages
            assert unclamped.sum() > 0
            torch.testing.assert_close(gap[unclamped], previous_gap[unclamped] / 2, rtol=1e-12, atol=0)
        previous_gap = gap
    if mapping == "const":
        assert torch.allclose(previous_gap, torch.full_like(t, 2.0**-10))


def test_ect_target_uses_the_same_dropout_mask_as_the_online_pass():
    """With r -> t the online and target passes see the same input; equal masks make the loss ~0."""
    model = EDMPrecond(random_unet(dropout=0.5), SD, sigma_min=0.002).train()
    loss = ECTLoss(sigma_data=SD, mapping="const", q=2.0)
    loss.stage = 40  # (t - r)/t = 2^-20 (the floor): the target input is the online one to 1e-6
    x0 = images(4)
    t = torch.tensor([0.2, 0.7, 2.0, 10.0], dtype=torch.float64)
    value = loss(model, x0, t=t, noise=torch.randn_like(x0))
    distance = value * (t - loss.t_to_r(t))  # undo the 1/(t - r) weight: ||f(x_t, t) - f(x_r, r)||
    # Two passes with different masks on one input differ by O(1); equal masks by O(t - r).
    x_t = x0 + t.view(-1, 1, 1, 1) * torch.randn_like(x0)
    with torch.no_grad():
        other_masks = (model(x_t, t) - model(x_t, t)).flatten(1).norm(dim=1)
    assert other_masks.min() > 1e-2
    assert distance.max() < 1e-4


# ---------------------------------------------------------------------------------------------
# sCM


@pytest.mark.parametrize("wrapper", ["native", "converted"])
def test_scm_jvp_tangent_matches_a_central_finite_difference(wrapper):
    net = random_unet(seed=2)
    model = TrigFlowPrecond(net, SD) if wrapper == "native" else EDMAsTrigFlow(EDMPrecond(net, SD))
    loss = SCMLoss("sct", sigma_data=SD)
    x0 = images(4)
    z = SD * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([0.1, 0.6, 1.1, 1.5], dtype=torch.float64)
    cos_t, sin_t = t.cos().view(-1, 1, 1, 1), t.sin().view(-1, 1, 1, 1)
    x_t = cos_t * x0 + sin_t * z
    dxt_dt = cos_t * z - sin_t * x0
    F_minus, scaled_dF = loss.tangent(model, x_t, t, dxt_dt)

    # Central difference of F along the same tangent direction (v_x, v_t).
    v_x, v_t = cos_t * sin_t * dxt_dt, SD * t.cos() * t.sin()
    eps = 1e-6
    with torch.no_grad():
        plus = model.F(x_t / SD + eps * v_x, t + eps * v_t)
        minus = model.F(x_t / SD - eps * v_x, t - eps * v_t)
        central = (plus - minus) / (2 * eps)
        torch.testing.assert_close(F_minus, model.F(x_t / SD, t))
    assert central.abs().max() > 1e-3
    assert relative_error(scaled_dF, central) < 1e-3
    # ... which is sd cos t sin t times the total derivative of F along the data path.
    with torch.no_grad():
        def along_path(s):
            x_s = s.cos().view(-1, 1, 1, 1) * x0 + s.sin().view(-1, 1, 1, 1) * z
            return model.F(x_s / SD, s)
        total = (along_path(t + eps) - along_path(t - eps)) / (2 * eps)
    assert relative_error(scaled_dF, SD * cos_t * sin_t * total) < 1e-3


def _write_teacher(path, seed: int = 7) -> None:
    """A 'pretrained' xxs teacher: random non-zero weights, saved like a final.pt."""
    torch.manual_seed(seed)
    config = RunConfig(method="edm", preset="xxs", budget_iters=1)
    net = build_method(config, img_channels=1).model.net
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 0.5 / math.sqrt(parameter[0].numel()))
    torch.save({"net": net.state_dict()}, path)


@pytest.mark.parametrize("method,from_teacher", [("sct", False), ("sct", True), ("scd", True), ("scd", False)])
def test_scm_loss_is_finite_with_a_nonzero_gradient(tmp_path, method, from_teacher):
    teacher_path = tmp_path / "teacher.pt"
    _write_teacher(teacher_path)
    config = RunConfig(method=method, preset="xxs", budget_iters=10, batch_size=8,
                       teacher_ckpt=str(teacher_path) if (from_teacher or method == "scd") else None)
    torch.manual_seed(0)
    built = build_method(config, img_channels=1)
    if method == "scd" and not from_teacher:
        # sCD from a fresh student: the loss must train it too (build_method starts sCD from the teacher).
        built.model = TrigFlowPrecond(build_unet("xxs", 16, 1), SD)
    assert isinstance(built.model, EDMAsTrigFlow if from_teacher else TrigFlowPrecond)
    assert (built.teacher is not None) == (method == "scd")
    built.set_iteration(10**6)  # full tangent warm-up
    x0 = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    value = built.loss(x0)
    assert value.shape == (8,) and torch.isfinite(value).all()
    value.mean().backward()
    network_grad = sum(float(p.grad.abs().sum()) for p in built.model.parameters() if p.grad is not None)
    weight_grad = sum(float(p.grad.abs().sum()) for p in built.extra_modules[0].parameters())
    assert math.isfinite(network_grad) and network_grad > 0
    assert math.isfinite(weight_grad) and weight_grad > 0


def test_scm_warmup_ramps_the_tangent_weight_from_zero_to_one():
    loss = SCMLoss("sct", warmup_iters=100)
    values = []
    for iteration in (0, 50, 100, 1000):
        loss.set_iteration(iteration)
        values.append(loss.warmup)
    assert values == [0.0, 0.5, 1.0, 1.0]
    t = loss.sample_t(10_000, torch.device("cpu"))
    tau = torch.log(SD * t.tan())  # tan t = exp(tau) / sd, tau ~ N(-1.0, 1.4^2)
    assert abs(float(tau.mean()) + 1.0) < 0.05 and abs(float(tau.std()) - 1.4) < 0.05


def test_ect_stage_length_comes_from_the_budget_or_is_given(tmp_path):
    _write_teacher(tmp_path / "teacher.pt")
    common = dict(method="ect", preset="xxs", budget_iters=400, teacher_ckpt=str(tmp_path / "teacher.pt"))
    assert build_method(RunConfig(**common, ect={"num_stages": 4}), img_channels=1).loss_fn.iters_per_stage == 100
    built = build_method(RunConfig(**common, ect={"num_stages": 4, "iters_per_stage": 30}), img_channels=1)
    built.set_iteration(95)
    assert built.loss_fn.iters_per_stage == 30 and built.loss_fn.stage == 3


def test_ect_loss_stays_finite_far_past_the_last_stage():
    """The decay is floored (2^-20) so r never rounds to t and 1/(t - r) never divides by zero."""
    model = EDMPrecond(random_unet(dtype=torch.float32), SD, sigma_min=0.002)
    loss = ECTLoss(sigma_data=SD, mapping="const", iters_per_stage=1)
    loss.set_iteration(10**6)
    t64 = torch.logspace(-3, 3, 8, dtype=torch.float64)
    assert torch.allclose((t64 - loss.t_to_r(t64)) / t64, torch.full_like(t64, 2.0**-20), rtol=1e-9)
    t = t64.float()
    assert (loss.t_to_r(t) < t).all()  # still resolvable in fp32
    x0 = images(8, dtype=torch.float32)
    value = loss(model, x0, t=t, noise=torch.randn_like(x0))
    assert torch.isfinite(value).all()


# ---------------------------------------------------------------------------------------------
# The recipe table


def test_every_method_has_one_recipe_and_the_teacher_rule_matches_the_config():
    from cmscale.config import METHODS, STUDENT_METHODS

    assert set(RECIPES) == set(METHODS)
    assert {name for name, recipe in RECIPES.items() if recipe.teacher == "required"} == set(STUDENT_METHODS)
    for name, recipe in RECIPES.items():
        assert hasattr(RunConfig(method="edm", preset="xxs", budget_iters=1), recipe.options), name


def test_no_method_name_is_compared_outside_the_recipe_table():
    """What differs between methods is declared in cmscale/methods.py's table, not in branches elsewhere."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "cmscale"
    names = "|".join(RECIPES)
    branch = re.compile(rf"method\s*(==|!=)\s*[\"'](?:{names})[\"']|method\s+(not\s+)?in\s+\(\s*[\"'](?:{names})")
    offenders = [f"{path.relative_to(package.parent)}:{number}" for path in sorted(package.rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert offenders == []


def test_sampler_steps_are_read_and_replaced_in_the_recipes_field():
    edm = RunConfig(method="edm", preset="xxs", budget_iters=1)
    sct = RunConfig(method="sct", preset="xxs", budget_iters=1)
    assert sampler_steps(edm) == edm.edm.heun_steps and sampler_steps(sct) == sct.eval.cm_steps
    assert sampler_steps(with_sampler_steps(edm, [5])) == [5] and with_sampler_steps(edm, [5]).eval == edm.eval
    assert sampler_steps(with_sampler_steps(sct, [3])) == [3] and with_sampler_steps(sct, [3]).edm == sct.edm


@pytest.mark.parametrize("method", list(RECIPES))
def test_built_methods_follow_their_recipe(tmp_path, method):
    teacher = tmp_path / "teacher.pt"
    torch.save({"net": build_unet("xxs", 8, 1).state_dict()}, teacher)
    config = RunConfig(method=method, preset="xxs", resolution=8, budget_iters=4,
                       teacher_ckpt=str(teacher) if recipe_of(method).teacher != "none" else None)
    built = build_method(config, img_channels=1)
    assert built.recipe is RECIPES[method] and built.network is network_of(built.model)
    assert (built.teacher is not None) == RECIPES[method].teacher_in_loss
    assert bool(built.extra_modules) == RECIPES[method].learned_weight
    x0 = torch.zeros(2, 1, 8, 8)
    draws = built.sample_draws(x0.shape, torch.device("cpu"))
    assert set(draws) == {RECIPES[method].time_draw, "noise"}
    assert built.loss(x0, **draws).shape == (2,)
    with pytest.raises(ValueError, match="unconditional"):
        built.loss(x0, labels=torch.zeros(2, dtype=torch.long), **draws)


def test_an_unreadable_teacher_is_named_not_a_traceback(tmp_path):
    garbage = tmp_path / "teacher.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    config = RunConfig(method="ect", preset="xxs", budget_iters=1, teacher_ckpt=str(garbage))
    with pytest.raises(TeacherCheckpointError, match=rf"teacher checkpoint {garbage} cannot be read"):
        build_method(config, img_channels=1)
