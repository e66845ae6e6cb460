"""The losses (cmscale.models.losses) against the official recipes where they used to differ (issue 14).

ECT against locuslab/ect's ECMLoss and ECMPrecond (main branch, CIFAR-10 setting), written out here
independently from their equations; sCM's residual under bf16, its learned log-variance head and
FastGen's tangent normalisation against closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_methods import _write_teacher, images, random_unet

from cmscale.config import RunConfig
from cmscale.methods import build_method, method_conventions
from cmscale.models.edm_networks import SongUNet
from cmscale.models.flops import count_flops
from cmscale.models.losses import AdaptiveWeight, ECTLoss, SCMLoss, _per_sample, _sum_per_sample, same_random_state
from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond
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
