"""ECT's ImageNet-64 recipe options (locuslab/ect, branch imgnet, run_imgnet_ecm.sh), each against its equation:
the snrpk weighting, EDM2's inverse-square-root learning rate, dropout only at low resolutions."""

from __future__ import annotations

import math

import pytest
import torch

from cmscale.config import RunConfig
from cmscale.methods import build_network
from cmscale.models.losses import ECTLoss
from cmscale.schedule import learning_rate


def test_snrpk_weighting_is_one_over_t_squared_plus_one_over_sigma_data_squared():
    loss = ECTLoss(weighting="snrpk", sigma_data=0.5)
    t = torch.tensor([0.01, 0.3, 1.526, 80.0], dtype=torch.float64)
    torch.testing.assert_close(loss.weight(t, 0.5 * t), 1 / t**2 + 1 / 0.25, rtol=1e-14, atol=0)


def test_inverse_square_root_lr_is_edm2s_learning_rate_schedule():
    # EDM2's training_loop.learning_rate_schedule without ramp-up: ref_lr / sqrt(max(nimg / (ref_batches B), 1)),
    # nimg the images seen before the step (step * B).
    config = RunConfig(method="edm", preset="xxs", budget_iters=10, lr=1e-3, lr_schedule="inv_sqrt",
                       lr_ref_batches=2000, batch_size=128)
    for step in (0, 1999, 2000, 8000, 100_000):
        nimg = step * 128
        expected = 1e-3 / math.sqrt(max(nimg / (2000 * 128), 1))
        assert learning_rate(config, step, 200_000) == pytest.approx(expected, rel=1e-12)


def test_dropout_res_keeps_dropout_to_the_low_resolution_blocks():
    config = RunConfig(method="edm", preset="edm2-t16", resolution=16, budget_iters=1, dropout=0.4, dropout_res=8)
    net = build_network(config, img_channels=1)
    rates = {name: block.dropout.p for name, block in [*net.unet.enc.items(), *net.unet.dec.items()]
             if hasattr(block, "dropout")}
    assert rates and all(rate == (0.4 if int(name.split("x")[0]) <= 8 else 0.0) for name, rate in rates.items())
    with pytest.raises(ValueError, match="dropout_res applies to EDM2 networks"):
        RunConfig(method="edm", preset="xxs", budget_iters=1, dropout_res=16)


@pytest.mark.slow  # counts the FLOPs of the 280M-1.1B-parameter networks (about 20 s)
def test_the_imagenet64_example_plans_ect_and_scd_over_edm2s_ladder(tmp_path):
    from pathlib import Path

    from cmscale.sweep.plan import plan_sweep
    from cmscale.sweep.spec import load_spec

    teacher = tmp_path / "teacher.pt"
    teacher.touch()
    example = Path(__file__).resolve().parents[1] / "examples" / "sweep_imagenet64_edm2.toml"
    overrides = {"data_path": str(tmp_path), **{f"teacher.checkpoints.edm2-img64-{size}": str(teacher)
                                                 for size in ("s", "m", "l", "xl")}}
    runs = plan_sweep(load_spec(example, overrides), tmp_path / "results")
    ect = {run.config.preset: run.config for run in runs if run.config.method == "ect"}
    assert list(ect) == ["edm2-img64-s", "edm2-img64-m", "edm2-img64-l", "edm2-img64-xl"]
    assert [config.lr for config in ect.values()] == [1e-3, 9e-4, 8e-4, 7e-4]
    s = ect["edm2-img64-s"]
    assert (s.label_dim, s.ect.weighting, s.ect.q, s.ect.t_mid, s.lr_schedule, s.lr_ref_batches, s.dropout_res) == (
        1000, "snrpk", 4.0, 1.526, "inv_sqrt", 2000, 16)
    assert {run.config.preset for run in runs if run.config.method == "scd"} == {"edm2-img64-s", "edm2-img64-m"}
