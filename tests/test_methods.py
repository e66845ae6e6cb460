"""Methods (cmscale.methods): one recipe per method, the built method follows it, ECT's stage length, and an
unreadable teacher named."""

from __future__ import annotations

import pytest
import torch
from small_nets import _write_teacher

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
from cmscale.models.presets import build_unet

# ---------------------------------------------------------------------------------------------
# ECT's stage length


def test_ect_stage_length_comes_from_the_budget_or_is_given(tmp_path):
    _write_teacher(tmp_path / "teacher.pt")
    common = dict(method="ect", preset="xxs", budget_iters=400, teacher_ckpt=str(tmp_path / "teacher.pt"))
    assert build_method(RunConfig(**common, ect={"num_stages": 4}), img_channels=1).loss_fn.iters_per_stage == 100
    built = build_method(RunConfig(**common, ect={"num_stages": 4, "iters_per_stage": 30}), img_channels=1)
    built.set_iteration(95)
    assert built.loss_fn.iters_per_stage == 30 and built.loss_fn.stage == 3


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
