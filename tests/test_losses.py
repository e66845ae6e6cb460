"""The losses (cmscale.models.losses) against their equations and the official recipes.

ECT against locuslab/ect's ECMLoss and ECMPrecond (main branch, CIFAR-10 setting), written out here
independently from their equations; ECT's target pass on the rows with r > 0 only; sCM's JVP tangent
against finite differences, its residual under bf16, its learned log-variance head and FastGen's tangent
normalisation against closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch
from small_nets import _write_teacher, images, random_unet, relative_error

from cmscale.config import RunConfig
from cmscale.methods import build_method, method_conventions
from cmscale.models.edm_networks import SongUNet
from cmscale.models.flops import count_flops
from cmscale.models.losses import (
    AdaptiveWeight,
    ECTLoss,
    EDMLoss,
    SCMLoss,
    _per_sample,
    _sum_per_sample,
    same_random_state,
)
from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond, TrigFlowPrecond
from cmscale.models.presets import build_unet
from cmscale.models.unet import PositionalEmbedding, UNet

SD = 0.5


# ---------------------------------------------------------------------------------------------
# ECT: the official ECMPrecond / ECMLoss, written out


def official_ecm_precond(net, x, sigma, training: bool, sigma_min: float = 0.003, sigma_data: float = 0.5):
    """ECMPrecond.forward: plain EDM c_skip/c_out in training mode, shifted by sigma_min in eval mode."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    if training:
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    else:
        c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
        c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip * x + c_out * net(c_in * x, c_noise.flatten())


def official_ecm_loss(net, images, t, eps, stage, q=2.0, k=8.0, b=1.0, c=0.0):
    """ECMLoss.__call__ (sigmoid mapping, weight 1/(t - r)) on given draws t and eps, in training mode."""
    t = t.reshape(-1, 1, 1, 1)
    r = (t * (1 - (1 / q ** (stage + 1)) * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)
    D_yt = official_ecm_precond(net, images + eps * t, t, training=True)
    with torch.no_grad():
        D_yr = official_ecm_precond(net, images + eps * r, r, training=True)
    mask = r > 0
    D_yr = mask * torch.nan_to_num(D_yr) + (~mask) * images
    loss = ((D_yt - D_yr) ** 2).reshape(len(t), -1).sum(dim=-1)
    loss = torch.sqrt(loss + c**2) - c if c > 0 else torch.sqrt(loss)
    return loss / (t - r).flatten()


def test_default_ect_loss_in_training_mode_equals_the_official_ecm_computation(tmp_path):
    _write_teacher(tmp_path / "teacher.pt")
    config = RunConfig(method="ect", preset="xxs", budget_iters=800, teacher_ckpt=str(tmp_path / "teacher.pt"))
    assert (config.ect.sigma_min, config.ect.boundary_shift) == (0.003, "eval")
    built = build_method(config, img_channels=1)
    model = built.model.double()
    assert model.training
    built.set_iteration(150)  # stage 1 of 8 (100 iterations each): r = 0 for t <= 0.51, r > 0 above
    assert built.loss_fn.stage == 1
    net = model.net
    x0 = (torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).double()
    eps = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0.002, 0.004, 0.05, 0.3, 1.0, 2.5, 10.0, 80.0], dtype=torch.float64)
    r = built.loss_fn.t_to_r(t)
    assert (r == 0).any() and (r > 0).any()

    ours = built.loss_fn(model, x0, t=t, noise=eps)
    ours.sum().backward()
    our_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    official = official_ecm_loss(net, x0, t, eps, stage=1)
    official.sum().backward()
    torch.testing.assert_close(ours, official, rtol=1e-12, atol=0)
    for got, want in zip(our_grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)

    # In eval mode (the EMA model when sampling and computing FID) the shift applies, and makes a difference.
    x = x0 + 0.01 * eps
    sigma = torch.full((8,), 0.01, dtype=torch.float64)
    with torch.no_grad():
        evaluated = model.eval()(x, sigma)
        official = official_ecm_precond(net, x, sigma, training=False)
        torch.testing.assert_close(evaluated, official, rtol=1e-12, atol=1e-12)
        assert (evaluated - model.train()(x, sigma)).abs().max() > 1e-3


def test_ect_student_starts_as_its_teacher_and_c_out_stays_positive_in_training_mode():
    net = random_unet()
    teacher = EDMPrecond(net, SD)  # plain EDM
    student = EDMPrecond(net, SD, sigma_min=0.003).train()  # ECT's default: shift only in eval mode
    x = images(3)
    sigma = torch.tensor([0.001, 0.002, 0.01], dtype=torch.float64)  # below and near sigma_min
    with torch.no_grad():
        assert torch.equal(student(x, sigma), teacher(x, sigma))
        always = EDMPrecond(net, SD, sigma_min=0.003, boundary_shift="always").train()
        assert (always(x, sigma) - teacher(x, sigma)).abs().max() > 1e-4  # the old behaviour differs
        off = EDMPrecond(net, SD, sigma_min=0.003, boundary_shift="off").eval()
        assert torch.equal(off(x, sigma), teacher(x, sigma))
    with pytest.raises(ValueError, match="boundary_shift"):
        EDMPrecond(net, SD, boundary_shift="sometimes")


# ---------------------------------------------------------------------------------------------
# sCM


def test_scm_residual_is_exactly_minus_g_under_cpu_bf16_autocast():
    net = random_unet(dtype=torch.float32)
    model = EDMAsTrigFlow(EDMPrecond(net, SD))
    loss = SCMLoss("sct", sigma_data=SD, warmup_iters=0)
    x0 = images(4, dtype=torch.float32)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.05, 0.4, 0.9, 1.4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss.terms(model, x0, t=t, noise=noise)
    assert terms.F_theta.dtype == torch.bfloat16 and terms.F_minus.dtype == torch.float32
    # F_theta - F- would leave a spurious residual: bf16 and fp32 forwards differ.
    assert (terms.F_theta.float() - terms.F_minus).abs().max() > 1e-3
    assert torch.equal(terms.residual, -terms.g)
    # ... while the residual still carries F_theta's gradient: d/dF ||F - sg[F] - g||^2 = -2 g.
    grad = torch.autograd.grad((terms.residual**2).sum(), terms.F_theta)[0]
    torch.testing.assert_close(grad.float(), (-2 * terms.g).to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


def test_log_variance_head_fits_minus_log_sd_tan_t_over_the_whole_sampled_range():
    """Least squares on the head's own features: max error under 0.05 nats for t in [t_min, t_max]."""
    loss = SCMLoss("sct", sigma_data=SD)
    t = torch.linspace(loss.t_min, loss.t_max, 4001, dtype=torch.float64)
    target = -(SD * t.tan()).log()
    head = AdaptiveWeight(128, SD)

    def least_squares_error(features: torch.Tensor) -> tuple[float, torch.Tensor]:
        design = torch.cat([features, torch.ones(len(t), 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, target[:, None], driver="gelsd").solution[:, 0]
        return float((design @ solution - target).abs().max()), solution

    error, solution = least_squares_error(head.features(t).double())
    with torch.no_grad():  # load the fit into the head and evaluate the module itself (fp32 weights)
        head.linear.weight.copy_(solution[:-1][None])
        head.linear.bias.copy_(solution[-1:])
        fitted = head(t.float()).double()
    assert error < 0.05
    assert float((fitted - target).abs().max()) < 0.05
    # The former head (a positional embedding of t itself) misfits the smallest t by over a nat.
    former_error, _ = least_squares_error(PositionalEmbedding(128)(t))
    assert former_error > 1.0


def test_fastgen_rms_normalisation_is_l2_with_c_sqrt_d_in_value_and_scaled_in_gradient():
    """FastGen's default (RMS norm, a second 1/D) = 'l2' with c sqrt(D): same loss, F-gradient / sqrt(D)."""
    x0 = images(4)
    dimension = x0[0].numel()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = torch.tensor([0.05, 0.4, 0.9, 1.4], dtype=torch.float64)

    def run(tangent_norm: str, c: float):
        model = EDMAsTrigFlow(EDMPrecond(random_unet(seed=4), SD))
        loss = SCMLoss("sct", sigma_data=SD, warmup_iters=0, tangent_norm=tangent_norm, tangent_norm_c=c)
        loss.adaptive_weight.double()
        with torch.no_grad():
            loss.adaptive_weight.linear.bias.fill_(0.3)  # a non-zero log-variance
        value = loss(model, x0, t=t, noise=noise)
        value.sum().backward()
        net_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        weight_grad = torch.cat([p.grad.flatten() for p in loss.adaptive_weight.parameters()])
        return value.detach(), net_grad, weight_grad, loss

    fastgen, fastgen_net, fastgen_weight, fastgen_loss = run("fastgen_rms", 0.1)
    l2, l2_net, l2_weight, _ = run("l2", 0.1 * math.sqrt(dimension))
    plain_l2, _, _, _ = run("l2", 0.1)
    torch.testing.assert_close(fastgen, l2, rtol=1e-10, atol=0)
    torch.testing.assert_close(fastgen_weight, l2_weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fastgen_net, l2_net / math.sqrt(dimension), rtol=1e-9, atol=1e-14)
    assert fastgen_loss.effective_l2_c(dimension) == pytest.approx(0.1 * math.sqrt(dimension))
    assert (fastgen - plain_l2).abs().max() > 1e-3  # the effective c matters: the check is not vacuous


def test_every_run_records_its_normalisation_and_boundary_shift():
    scm = RunConfig(method="sct", preset="xxs", budget_iters=1, resolution=16, scm={"tangent_norm": "fastgen_rms"})
    conventions = method_conventions(scm, img_channels=1)
    assert conventions["tangent_norm"] == "fastgen_rms" and conventions["loss_dimension_divisor"] == "D^2"
    assert conventions["tangent_norm_effective_l2_c"] == pytest.approx(0.1 * 16)
    default = method_conventions(RunConfig(method="scd", preset="xxs", budget_iters=1, teacher_ckpt="t.pt"), 1)
    assert default["tangent_norm"] == "l2" and default["tangent_norm_effective_l2_c"] == 0.1
    ect = method_conventions(RunConfig(method="ect", preset="xxs", budget_iters=1, teacher_ckpt="t.pt"), 1)
    assert ect == {"boundary_shift": "eval", "boundary_sigma_min": 0.003}


def _random(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(max(1, parameter[0].numel())))
    return net.double()


def _networks():
    return {
        "unet": UNet(
            img_resolution=8,
            img_channels=1,
            model_channels=8,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(4,),
            dropout=0.3,
        ),
        "ddpmpp": SongUNet(
            8, 1, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.3
        ),
    }


def full_batch_ect_loss(loss: ECTLoss, model, x0, t, noise):
    """The previous ECT step: target on every row, masks redrawn from the restored RNG state."""
    r = loss.t_to_r(t)
    with same_random_state(x0.device):
        online = model(x0 + _per_sample(t, x0) * noise, t)
    with torch.no_grad():
        r_safe = r.clamp(min=1e-12)
        target = model(x0 + _per_sample(r_safe, x0) * noise, r_safe)
        target = torch.where(_per_sample(r, x0) > 0, torch.nan_to_num(target), x0)
    return loss.distance(_sum_per_sample((online - target) ** 2)) * loss.weight(t, r)


# ---------------------------------------------------------------------------------------------
# ECT's target pass: only the rows with r > 0, with the online pass's dropout masks


@pytest.mark.parametrize("network", ["unet", "ddpmpp"])
@pytest.mark.parametrize("stage", [0, 3])
def test_loss_and_gradient_equal_the_full_batch_computation_on_the_same_draws(network, stage):
    model = EDMPrecond(_random(_networks()[network]), sigma_min=0.002).train()
    loss = ECTLoss(c=0.01, iters_per_stage=1)
    loss.set_iteration(stage)
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(6, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(6, 1, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.05, 0.8, 2.5, 1.5, 9.0, 40.0], dtype=torch.float64)
    r = loss.t_to_r(t)
    # stage 0: rows with and without a target; stage 3: a target on every row
    assert ((r == 0).any() and (r > 0).any()) if stage == 0 else (r > 0).all()

    values = {}
    for name, fn in (("fast", loss.__call__), ("full", lambda *a, **k: full_batch_ect_loss(loss, *a, **k))):
        model.zero_grad()
        torch.manual_seed(11)  # the same dropout draws for both
        value = fn(model, x0, t=t, noise=noise)
        value.sum().backward()
        values[name] = (value.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        after = torch.rand(1)  # the random stream is left where the full computation leaves it
        values[name] += (after,)
    torch.testing.assert_close(values["fast"][0], values["full"][0], rtol=1e-12, atol=1e-12)
    for fast, full in zip(values["fast"][1], values["full"][1]):
        torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-12)
    assert torch.equal(values["fast"][2], values["full"][2])


def test_target_work_is_proportional_to_the_rows_with_r_positive():
    model = EDMPrecond(_random(_networks()["ddpmpp"]), sigma_min=0.002).train()
    x0 = torch.zeros(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        forward = count_flops(lambda: model(x0, torch.ones(4, dtype=torch.float64)))  # 4 rows
    loss = ECTLoss()
    for t, rows_with_target in (([0.1, 0.5, 1.0, 1.5], 0), ([0.1, 5.0, 1.0, 20.0], 2), ([3.0, 5.0, 9.0, 20.0], 4)):
        t = torch.tensor(t, dtype=torch.float64)
        assert int((loss.t_to_r(t) > 0).sum()) == rows_with_target
        with torch.no_grad():
            counted = count_flops(lambda t=t: loss(model, x0, t=t, noise=torch.ones_like(x0)))
        assert counted == forward + forward * rows_with_target // 4


@pytest.mark.parametrize("mapping,stage", [("sigmoid", 0), ("sigmoid", 1), ("sigmoid", 4), ("const", 0)])
def test_expected_share_of_target_rows_matches_sampling(mapping, stage):
    loss = ECTLoss(mapping=mapping, iters_per_stage=1)
    loss.set_iteration(stage)
    generator = torch.Generator().manual_seed(0)
    t = (torch.randn(400_000, generator=generator, dtype=torch.float64) * loss.P_std + loss.P_mean).exp()
    sampled = (loss.t_to_r(t) > 0).double().mean().item()
    assert abs(loss.target_row_fraction(stage) - sampled) < 3e-3
    if mapping == "sigmoid" and stage == 0:
        assert abs(loss.target_row_fraction(0) - 0.19) < 0.01  # about 81% of stage-0 rows skip the target


# ---------------------------------------------------------------------------------------------
# ECT against its equations


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
# sCM against its equations


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


# ---------------------------------------------------------------------------------------------
# ECT far past its last stage


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
# ECT's ImageNet-64 weighting (locuslab/ect, branch imgnet)


def test_snrpk_weighting_is_one_over_t_squared_plus_one_over_sigma_data_squared():
    loss = ECTLoss(weighting="snrpk", sigma_data=0.5)
    t = torch.tensor([0.01, 0.3, 1.526, 80.0], dtype=torch.float64)
    torch.testing.assert_close(loss.weight(t, 0.5 * t), 1 / t**2 + 1 / 0.25, rtol=1e-14, atol=0)
