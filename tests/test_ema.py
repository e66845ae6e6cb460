"""The EMA of a run (cmscale.models.ema): the power-function EMA's gamma and closed-form weights, fixed-rate
averages beside it, the state an EMA saves, and run ids that do not change without power EMAs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cmscale.config import RunConfig
from cmscale.models.ema import EMA, MAX_SIGMA_REL, power_ema_gamma
from cmscale.train import Trainer

NO_EVAL = {"at_fractions": []}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("CMSCALE_NUM_THREADS", "1")


def test_power_ema_gamma_matches_edm2_and_its_width_equation():
    # EDM2 (Karras et al. 2024), Sec. 3.1: sigma_rel 0.10 <-> gamma 6.94, sigma_rel 0.05 <-> gamma 16.97.
    assert power_ema_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert power_ema_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    for sigma_rel in (0.02, 0.1, 0.25):
        gamma = power_ema_gamma(sigma_rel)
        assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        power_ema_gamma(0.3)


def test_a_runs_power_ema_is_the_closed_form_weighted_average_of_its_weights(tmp_path):
    """After T steps the power EMA is sum_t w_t theta_t, w_t = (t^(g+1) - (t-1)^(g+1)) / T^(g+1); the
    fixed-rate EMA beside it keeps its own rule, and the power EMA (listed first) is the exported one."""

    steps, sigma_rel = 9, 0.15
    config = RunConfig(method="edm", preset="xxs", batch_size=4, budget_iters=steps, ema_rates=[0.5],
                       ema_sigma_rels=[sigma_rel], eval=NO_EVAL, log_every=100, ckpt_every=100)
    trainer = Trainer(config, tmp_path / "run")
    initial = next(trainer.method.model.parameters()).detach().clone().double()
    trajectory = []
    for _ in range(steps):
        trainer.train_step()
        trajectory.append([p.detach().clone().double() for p in trainer.method.model.parameters()])
    gamma = power_ema_gamma(sigma_rel)
    weights = [(t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / steps ** (gamma + 1) for t in range(1, steps + 1)]
    assert sum(weights) == pytest.approx(1.0)
    power_ema, fixed_ema = trainer.ema.averages
    for index, ema_param in enumerate(power_ema.parameters()):
        expected = sum(w * theta[index] for w, theta in zip(weights, trajectory))
        torch.testing.assert_close(ema_param.double(), expected, rtol=1e-5, atol=1e-6)
    # The fixed rate 0.5 starts from the initial weights and gives its last step a weight of 1/2.
    assert weights[-1] != pytest.approx(0.5)
    first = next(fixed_ema.parameters()).double()
    expected_fixed = 0.5**steps * initial + sum(0.5 ** (steps - t + 1) * theta[0] for t, theta in
                                                 zip(range(1, steps + 1), trajectory))
    torch.testing.assert_close(first, expected_fixed, rtol=1e-5, atol=1e-6)


def test_power_emas_leave_the_run_ids_of_runs_without_them_unchanged():
    config = RunConfig(method="edm", preset="xxs", budget_iters=10)
    assert "ema_sigma_rels" not in config.identity()
    assert "ema_sigma_rels" in config.model_copy(update={"ema_sigma_rels": [0.1]}).identity()


def test_an_ema_owns_its_copies_updates_them_and_round_trips_its_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, sigma_rels=[0.1], rates=[0.5])
    assert len(ema.averages) == 2 and ema.evaluated is ema.averages[0]
    assert all(not p.requires_grad for average in ema.averages for p in average.parameters())
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(1)  # the power EMA's first update takes the weights whole (beta_1 = 0); the rate 0.5 halves
    torch.testing.assert_close(ema.averages[0][0].weight, model[0].weight)
    torch.testing.assert_close(ema.averages[1][0].weight, start + 0.5)
    assert all(float(average[1].running_mean[0]) == 3.0 for average in ema.averages)  # buffers are copied
    restored = EMA(model, sigma_rels=[0.1], rates=[0.5])
    restored.load_state_dict(ema.state_dict())
    for mine, theirs in zip(restored.averages, ema.averages):
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(mine.state_dict()[key], value)
    assert EMA(model).evaluated is model  # no averages: the model itself is evaluated


def test_the_sigma_rel_bound_is_the_uniform_average_and_the_config_uses_it():
    assert MAX_SIGMA_REL == pytest.approx(math.sqrt(1 / 12))  # gamma = 0
    assert power_ema_gamma(MAX_SIGMA_REL * 0.999) == pytest.approx(0.0, abs=0.02)
    with pytest.raises(ValueError, match="ema_sigma_rels"):
        RunConfig(method="edm", preset="xxs", budget_iters=1, ema_sigma_rels=[MAX_SIGMA_REL])
