"""FLOP accounting (cmscale.accounting): counted step costs, the process-wide cache, budgets in FLOPs; ECT's
expected cost summed stage by stage; a budget below one step refused with the step's FLOPs."""

from __future__ import annotations

import json

import pytest

from cmscale.accounting import (
    BudgetError,
    FlopsCache,
    count_flops_per_step,
    ect_iterations,
    ect_step_parts,
    ect_train_flops,
    flops_per_step,
    iterations_for_budget,
    train_flops_at,
)
from cmscale.config import RunConfig
from cmscale.methods import build_method
from cmscale.models.losses import ECTLoss
from cmscale.rundir import budget_in_flops
from cmscale.sweep.plan import plan_sweep
from cmscale.sweep.spec import SpecError, parse_spec


@pytest.mark.parametrize("preset", ["xxs"])
def test_flops_per_step_order_scd_over_ect_over_edm(preset):
    def flops(method: str) -> int:
        return flops_per_step(RunConfig(method=method, preset=preset, batch_size=16, budget_iters=1,
                                        teacher_ckpt="unused.pt" if method in ("ect", "scd") else None))

    edm, ect, sct, scd = flops("edm"), flops("ect"), flops("sct"), flops("scd")
    assert scd > ect >= edm > 0
    assert scd > sct > ect  # a JVP costs more than a no-grad target forward; sCD adds a teacher forward
    # ECT = EDM + the expected share of a no-grad target forward (rows with r > 0 only, about 19% at
    # stage 0 of a one-step run); sCD = sCT + one teacher forward (the teacher has the same size).
    share = ECTLoss().target_row_fraction(0)
    assert ect - edm == pytest.approx(share * (scd - sct), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# The FLOPs-per-step cache: one entry per step cost, never a stale count


def _flops_config(**update):
    base = RunConfig(method="sct", preset="xxs", budget_flops=1e12, batch_size=16, resolution=16)
    return base.model_copy(update=update)


CACHE_CHANGES = {
    "preset": {"preset": "xs"},
    "batch": {"batch_size": 32},
    "resolution": {"resolution": 8},
    "method": {"method": "edm"},
    "dropout": {"dropout": 0.1},
    "dataset": {"dataset": "cifar10"},
    "weight_mlp": {"scm": {"weight_mlp_channels": 64}},
}


def test_flops_cache_counts_each_step_cost_once_and_every_change_gets_its_own_entry():
    calls = []
    cache = FlopsCache(counter=lambda config: calls.append(FlopsCache.key(config)) or 1000 + len(calls))
    base = _flops_config()
    assert cache(base) == cache(base.model_copy(update={"lr": 0.1, "seed": 3})) == 1001  # cost unchanged: one count
    for change in CACHE_CHANGES.values():
        config = _flops_config(**change) if "scm" not in change else base.model_copy(
            update={"scm": base.scm.model_copy(update=change["scm"])})
        cache(config)
    assert len(calls) == 1 + len(CACHE_CHANGES) == len(set(calls))


@pytest.mark.parametrize("change", ["preset", "batch", "resolution", "method"])
def test_counted_flops_per_step_change_with_the_step_cost(change):
    assert count_flops_per_step(_flops_config(**CACHE_CHANGES[change])) != count_flops_per_step(_flops_config())


def test_flops_cache_on_disk_is_used_only_under_the_same_code_fingerprint(tmp_path):
    path = tmp_path / "flops_per_step.json"
    config = _flops_config()
    real = FlopsCache(path=path)
    counted = real(config)
    assert json.loads(path.read_text())["counts"] == {FlopsCache.key(config): counted}

    def no_counting(config):
        raise AssertionError("counted again although the disk cache holds the count")

    again = FlopsCache(path=path)
    again.counter = no_counting
    assert again(config) == counted  # a fresh process reads the count back
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({"fingerprint": "older-code", "counts": stored["counts"]}))
    stale = FlopsCache(path=path)
    stale.counter = lambda config: 7
    assert stale(config) == 7  # a count from other code is never used


def test_an_iteration_budget_in_flops_is_iterations_times_step_flops_and_a_flop_budget_is_itself():
    assert budget_in_flops(None, 30, 1e6) == 30e6
    assert budget_in_flops(5e9, 30, 1e6) == 5e9
    assert budget_in_flops(None, None, 1e6) is None and budget_in_flops(None, 30, None) is None


def test_ect_stage_length_is_the_same_for_the_loss_and_for_its_flops():
    """The trainer's loss and the expected-cost sum split a FLOP-budget run into the same stages."""
    config = RunConfig(method="ect", preset="xxs", budget_flops=3e9, batch_size=8, resolution=8,
                       teacher_ckpt="unused.pt", ect={"num_stages": 3})
    iterations = iterations_for_budget(config)
    built = build_method(config, img_channels=1, device="meta", load_weights=False, iterations=iterations)
    assert built.loss_fn.iters_per_stage == max(1, iterations // 3)
    online = count_flops_per_step(config.model_copy(update={"method": "edm", "teacher_ckpt": None}))
    # every step costs at least the online pass; the last ones (a later stage) cost more per step
    assert train_flops_at(config, iterations) >= iterations * online
    assert abs(train_flops_at(config, 2) - 2 * train_flops_at(config, 1)) <= 1  # one stage: the same cost per step


TINY_FLOPS = 1_000_000  # a stand-in FLOP counter: planning here needs no traced step


def tiny_flops(config: RunConfig) -> int:
    return TINY_FLOPS


def edm_spec(**changes) -> dict:
    return {"name": "s", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e8], "methods": {"edm": {}}} | changes


# ---------------------------------------------------------------------------------------------
# Budgets: one step at least; ECT's expected cost summed stage by stage


def test_budget_below_one_step_is_refused_with_the_step_flops(tmp_path):
    spec = parse_spec(edm_spec(budgets_flops=[1e3]))
    with pytest.raises(SpecError, match=r"budget_flops = 1000 is below one training step \(1e\+06 FLOPs per step"):
        plan_sweep(spec, tmp_path, flops_fn=tiny_flops)
    with pytest.raises(BudgetError, match="below one training step"):
        iterations_for_budget(RunConfig(method="edm", preset="xxs", budget_flops=1e3))


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
