"""Size ladders in the sweep spec: models defined by family and width plan, list and train without code changes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cmscale.cli import main
from cmscale.config import RunConfig
from cmscale.models.flops import meta_copy
from cmscale.models.presets import build_unet
from cmscale.models.unet import count_parameters
from cmscale.sweep.plan import plan_sweep
from cmscale.sweep.spec import SpecError, load_spec, parse_spec
from cmscale.train import train

SPEC = """
name = "ladder"
dataset = "digits"
resolution = 8
seeds = [0]
budgets_flops = [3e8]

[defaults]
batch_size = 8
log_every = 1
ckpt_every = 100
label_dim = 10
eval = { at_fractions = [] }

[methods.ect]

[teacher]
train = true
budget_iters = 2

[models.w]
family = "edm2"
channels = [8, 16]
blocks = 1
channel_mult = [1, 2]
attn_levels = [1]
"""


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "ladder.toml"
    path.write_text(SPEC)
    return path


def test_a_spec_defined_ladder_plans_lists_and_trains(spec_file, tmp_path):
    runs = plan_sweep(load_spec(spec_file), tmp_path / "results")
    by_preset = {(run.config.method, run.config.preset): run for run in runs}
    assert set(by_preset) == {("edm", "w-c8"), ("edm", "w-c16"), ("ect", "w-c8"), ("ect", "w-c16")}
    student = by_preset["ect", "w-c16"].config
    assert student.architecture.family == "edm2" and student.architecture.channels == 16
    # the architecture is part of the run's identity
    assert student.identity()["architecture"]["channels"] == 16
    params = {name: count_parameters(meta_copy(lambda n=name: build_unet(
        by_preset["edm", n].config.network_preset(), 8, 1, label_dim=10))) for name in ("w-c8", "w-c16")}
    assert params["w-c8"] < params["w-c16"]
    listed = CliRunner().invoke(main, ["sweep", "plan", str(spec_file), "--root", str(tmp_path / "results")],
                                env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert f"{params['w-c16']:,}" in listed.output and "FLOPs/step" in listed.output
    # the teacher trains, its checkpoint carries the architecture, and the student starts from it
    teacher = by_preset["edm", "w-c16"].config
    assert train(teacher, tmp_path / "teacher")["status"] == "done"
    final = torch.load(tmp_path / "teacher" / "ckpt" / "final.pt", weights_only=True)
    assert final["model_spec"]["channels"] == 16
    from cmscale.teacher import load_denoiser

    denoiser = load_denoiser(tmp_path / "teacher" / "ckpt" / "final.pt")  # the public loader rebuilds it too
    assert denoiser.label_dim == 10 and denoiser(torch.zeros(2, 1, 8, 8), 1.0, torch.tensor([3, 4])).shape == (
        2, 1, 8, 8)
    student = student.model_copy(update={"teacher_ckpt": str(tmp_path / "teacher" / "ckpt" / "final.pt")})
    assert train(student, tmp_path / "student")["status"] == "done"
    resolved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert resolved["params"] == params["w-c16"]


def test_bad_spec_models_are_refused_naming_the_field(tmp_path):
    with pytest.raises(SpecError, match="models.xs: the name is a built-in preset"):
        parse_spec({"name": "x", "models": {"xs": {"family": "edm2", "channels": 8, "blocks": 1}},
                    "methods": {"edm": {}}, "budgets_flops": [1e9]})
    with pytest.raises(SpecError, match="family"):
        parse_spec({"name": "x", "models": {"w": {"family": "resnet", "channels": 8, "blocks": 1}},
                    "methods": {"edm": {}}, "budgets_flops": [1e9]})
    with pytest.raises(SpecError, match="unknown preset 'w2'"):
        parse_spec({"name": "x", "presets": ["w2"], "models": {"w": {"family": "edm2", "channels": 8, "blocks": 1}},
                    "methods": {"edm": {}}, "budgets_flops": [1e9]})
    with pytest.raises(ValueError, match="not divisible by 8"):
        RunConfig(method="edm", preset="w", resolution=12, budget_iters=1,
                  architecture={"family": "edm2", "channels": 8, "blocks": 1})
