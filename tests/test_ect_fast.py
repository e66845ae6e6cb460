"""The faster ECT step: the target runs on rows with r > 0 only, with the online pass's dropout masks.

Claims: the loss equals the full-batch computation with restored RNG (the previous implementation)
on the same draws; the target's work is proportional to the rows with r > 0 (none: no target pass);
the expected share of those rows has the closed form used for budgets; budget -> iterations
planning sums the expected cost stage by stage, in the trainer and the sweep planner alike.
"""

import math

import pytest
import torch

from cmscale.accounting import ect_iterations, ect_step_parts, ect_train_flops, flops_per_step, iterations_for_budget
from cmscale.config import RunConfig
from cmscale.models.edm_networks import SongUNet
from cmscale.models.flops import count_flops
from cmscale.models.losses import ECTLoss, _per_sample, _sum_per_sample, same_random_state
from cmscale.models.precond import EDMPrecond
from cmscale.models.unet import UNet


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


@pytest.mark.parametrize("ect_options", [{"num_stages": 4}, {"iters_per_stage": 7}])
def test_budget_planning_sums_the_expected_cost_of_every_step_stage_by_stage(ect_options):
    base = dict(method="ect", preset="xxs", batch_size=16, teacher_ckpt="unused.pt", ect=ect_options)
    parts = ect_step_parts(RunConfig(**base, budget_iters=1))
    online, target = parts
    budget = 37.3 * (online + target)
    config = RunConfig(**base, budget_flops=budget)
    iterations = iterations_for_budget(config)
    # Brute force: each step's stage from the trainer's own schedule, its cost online + P(r > 0) target.
    loss = ECTLoss(
        iters_per_stage=ect_options.get("iters_per_stage") or max(1, iterations // ect_options["num_stages"])
    )

    def brute(steps: int) -> float:
        total = 0.0
        for step in range(steps):
            loss.set_iteration(step)
            total += online + loss.target_row_fraction(loss.stage) * target
        return total

    assert ect_train_flops(config, iterations, iterations, parts) == pytest.approx(brute(iterations), rel=1e-12)
    assert abs(brute(iterations) - budget) <= 0.5 * (online + target)  # within half a step of the budget
    assert iterations > round(budget / (online + target))  # cheaper than counting the target on every row
    assert flops_per_step(config) == round(brute(iterations) / iterations)
    assert ect_iterations(config, parts) == iterations


def test_the_sweep_planner_plans_ect_iterations_as_the_trainer_does(tmp_path, monkeypatch):
    from cmscale.sweep.plan import Planner
    from cmscale.sweep.spec import SweepSpec

    monkeypatch.setenv("CMSCALE_CACHE_DIR", str(tmp_path / "cache"))
    teacher = tmp_path / "t.pt"
    teacher.touch()  # planning checks that the checkpoint exists; it reads nothing from it
    spec = SweepSpec.model_validate(
        {
            "name": "ectplan",
            "dataset": "digits",
            "resolution": 16,
            "presets": ["xxs"],
            "seeds": [0],
            "budgets": {"start": 3e9, "stop": 3e10, "num": 3},
            "methods": {"ect": {}},
            "teacher": {"checkpoints": {"xxs": str(teacher)}},
        }
    )
    runs = [run for run in Planner(spec, tmp_path).plan() if run.config.method == "ect"]
    assert runs
    for run in runs:
        assert run.iterations == iterations_for_budget(run.config)
        assert run.flops_per_step == flops_per_step(run.config)
