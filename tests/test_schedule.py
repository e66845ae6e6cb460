"""The learning-rate schedule (cmscale.schedule): warm-up, then constant or cosine to the final ratio, or
EDM2's inverse square root."""

from __future__ import annotations

import math

import pytest
import torch

from cmscale.config import RunConfig
from cmscale.schedule import learning_rate
from cmscale.train import train

NO_EVAL = {"at_fractions": []}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("CMSCALE_NUM_THREADS", "1")


def test_cosine_lr_schedule_follows_its_closed_form_after_the_warm_up():
    config = RunConfig(method="edm", preset="xxs", budget_iters=101, lr=2e-3, lr_warmup_iters=10,
                       lr_schedule="cosine", lr_final_ratio=0.1)
    assert learning_rate(config, 0, 101) == pytest.approx(2e-4)  # warm-up: (step + 1) / warmup
    assert learning_rate(config, 10, 101) == pytest.approx(2e-3)  # decay starts at the full lr
    assert learning_rate(config, 55, 101) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))  # half-way: cos = 0
    assert learning_rate(config, 100, 101) == pytest.approx(2e-4)  # the last step: lr * lr_final_ratio
    constant = config.model_copy(update={"lr_schedule": "constant"})
    assert {learning_rate(constant, step, 101) for step in (10, 55, 100)} == {2e-3}


def test_a_cosine_run_takes_its_last_step_at_the_final_lr(tmp_path):
    """End to end: the optimiser's lr at the last step (kept in the checkpoint) is lr * lr_final_ratio."""
    config = RunConfig(method="edm", preset="xxs", batch_size=4, budget_iters=12, lr=1e-3, lr_schedule="cosine",
                       lr_final_ratio=0.25, ckpt_every=100, log_every=4, eval=NO_EVAL)
    train(config, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "ckpt" / "latest.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 12
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [pytest.approx(2.5e-4)]


def test_inverse_square_root_lr_is_edm2s_learning_rate_schedule():
    # EDM2's training_loop.learning_rate_schedule without ramp-up: ref_lr / sqrt(max(nimg / (ref_batches B), 1)),
    # nimg the images seen before the step (step * B).
    config = RunConfig(method="edm", preset="xxs", budget_iters=10, lr=1e-3, lr_schedule="inv_sqrt",
                       lr_ref_batches=2000, batch_size=128)
    for step in (0, 1999, 2000, 8000, 100_000):
        nimg = step * 128
        expected = 1e-3 / math.sqrt(max(nimg / (2000 * 128), 1))
        assert learning_rate(config, step, 200_000) == pytest.approx(expected, rel=1e-12)
