"""Class conditioning end to end: labels from the data through every method's loss, label dropout,
class-balanced guided sampling (classifier-free and autoguidance), eval rows, and bad input."""

from __future__ import annotations

import pytest
import torch

from cmscale.config import RunConfig
from cmscale.methods import build_method
from cmscale.models.edm2 import normalize
from cmscale.rundir import read_metrics
from cmscale.sampling import Guided, balanced_labels, model_from_checkpoint, sample
from cmscale.train import train

BASE = dict(preset="edm2-t16", resolution=8, batch_size=16, label_dim=10, log_every=1, ckpt_every=100,
            ema_rates=[0.9], heartbeat_s=60.0, device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    patcher = pytest.MonkeyPatch()
    patcher.setenv("CMSCALE_CACHE_DIR", str(tmp_path_factory.mktemp("cmscale-cache")))
    yield
    patcher.undo()


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """A conditional EDM teacher (label dropout 0.2) on digits, then ECT, sCT and sCD from it, each evaluated
    at its end with guidance 1.5 on class-balanced samples."""
    root = tmp_path_factory.mktemp("conditional")
    evals = {"at_fractions": [1.0], "num_samples": 40, "batch_size": 40, "kid_subsets": 0, "grid_images": 0}
    teacher = RunConfig(method="edm", budget_iters=4, lr=1e-2, label_dropout=0.2, guidance=1.5,
                        edm={"heun_steps": [2]}, eval=evals, **BASE)
    assert train(teacher, root / "edm")["status"] == "done"
    checkpoint = str(root / "edm" / "ckpt" / "final.pt")
    for method in ("ect", "sct", "scd"):
        config = RunConfig(method=method, budget_iters=2, lr=1e-3, label_dropout=0.2, guidance=1.5,
                           teacher_ckpt=None if method == "sct" else checkpoint, eval=evals,
                           **({"scm": {"warmup_iters": 0}} if method != "ect" else {}), **BASE)
        assert train(config, root / method)["status"] == "done", method
    return root, teacher


def test_conditional_runs_of_every_method_train_and_evaluate_with_guidance(runs):
    root, _ = runs
    for method in ("edm", "ect", "sct", "scd"):
        rows = read_metrics(root / method / "metrics.jsonl", kind="eval")
        assert rows, method
        for row in rows:
            assert row["guidance"] == 1.5 and row["guidance_kind"] == "classifier-free"
            assert row["class_balance"] == "balanced" and row["fid"] > 0
            # guided sampling evaluates the network twice per sampler step
            expected = 2 * (2 * row["sampler_steps"] - 1 if method == "edm" else row["sampler_steps"])
            assert row["nfe"] == expected, (method, row)


def test_guided_output_is_the_unconditional_plus_w_times_the_difference(runs):
    root, teacher = runs
    payload = torch.load(root / "edm" / "ckpt" / "final.pt", weights_only=True)
    model = model_from_checkpoint(teacher, payload, "cpu")
    with torch.no_grad():  # EDM2's gains start at zero; a few steps leave the labels' effect tiny
        for name, parameter in model.named_parameters():
            if name.endswith("gain"):
                parameter.fill_(0.5)
    labels = balanced_labels(0, 12, 10, "cpu")
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    x, sigma = torch.randn(12, 1, 8, 8), torch.full((12,), 1.3)
    with torch.no_grad():
        conditional = model(x, sigma, torch.nn.functional.one_hot(labels, 10).float())
        unconditional = model(x, sigma, torch.zeros(12, 10))
        guided = Guided(model, labels, 1.5, label_dim=10)(x, sigma)
        torch.testing.assert_close(guided, unconditional + 1.5 * (conditional - unconditional))
        assert (conditional - unconditional).abs().max() > 1e-2
        # autoguidance: the reference is the guide network with the same labels
        guide = model_from_checkpoint(teacher, torch.load(root / "ect" / "ckpt" / "final.pt", weights_only=True),
                                      "cpu")
        reference = guide(x, sigma, torch.nn.functional.one_hot(labels, 10).float())
        auto = Guided(model, labels, 2.0, guide=guide, label_dim=10)(x, sigma)
        torch.testing.assert_close(auto, reference + 2.0 * (conditional - reference))
        images, nfe = sample(teacher, model, (12, 1, 8, 8), 2, torch.Generator().manual_seed(0), "cpu", labels)
    assert images.shape == (12, 1, 8, 8) and nfe == 6


def test_label_dropout_trains_the_zero_label_branch_on_the_dropped_rows():
    config = RunConfig(method="edm", budget_iters=1, label_dropout=0.5, **BASE)
    method = build_method(config, img_channels=1)
    assert "label_keep" not in build_method(config.model_copy(update={"label_dropout": 0.0}), 1).sample_draws(
        (4, 1, 8, 8), torch.device("cpu"))
    torch.manual_seed(0)
    draws = method.sample_draws((4, 1, 8, 8), torch.device("cpu"))
    x0, labels = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    keep = draws["label_keep"]
    assert keep.dtype == torch.bool
    method.model.eval()
    with torch.no_grad():
        dropped = method.loss(x0, labels, **{**draws, "label_keep": torch.zeros(4, dtype=torch.bool)})
        unlabelled = method.loss_fn(method.model, x0, sigma=draws["sigma"], noise=draws["noise"],
                                    labels=torch.zeros(4, 10))
        kept = method.loss(x0, labels, **{**draws, "label_keep": torch.ones(4, dtype=torch.bool)})
        onehot = method.loss_fn(method.model, x0, sigma=draws["sigma"], noise=draws["noise"],
                                labels=torch.nn.functional.one_hot(labels, 10).float())
    torch.testing.assert_close(dropped, unlabelled, rtol=0, atol=0)
    torch.testing.assert_close(kept, onehot, rtol=0, atol=0)


def test_ects_target_pass_leaves_edm2s_weights_as_the_online_pass_normalised_them():
    config = RunConfig(method="ect", budget_iters=8, teacher_ckpt="unused", **BASE)
    method = build_method(config, img_channels=1, load_weights=False)
    method.model.double().train()
    layer = method.network.unet.out_conv
    before = layer.weight.detach().clone()
    method.set_iteration(7)  # a late stage: most rows have r > 0, so the target pass runs
    torch.manual_seed(0)
    draws = method.sample_draws((8, 1, 8, 8), torch.device("cpu"))
    assert (method.loss_fn.t_to_r(draws["t"]) > 0).any()
    method.loss(torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.arange(8), **draws)
    # once (the online pass), not twice: normalising again moves the weight by about eps = 1e-4
    torch.testing.assert_close(layer.weight.detach(), normalize(before), rtol=1e-12, atol=1e-12)
    assert (normalize(normalize(before)) - normalize(before)).abs().max() > 1e-8


@pytest.mark.parametrize("update,message", [
    ({"preset": "xxs"}, "label_dim 10: preset 'xxs' is cmscale's unconditional UNet"),
    ({"label_dim": 0, "label_dropout": 0.1}, "label_dropout drops class labels, but label_dim is 0"),
    ({"guidance": 2.0}, "guidance 2.0 needs an unconditional branch"),
])
def test_bad_conditioning_is_refused_naming_the_field(update, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(method="edm", budget_iters=1, **{**BASE, **update})


def test_a_label_dim_the_data_does_not_have_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="label_dim 7 does not fit the data: digits has 10 class labels"):
        train(RunConfig(method="edm", budget_iters=1, **{**BASE, "label_dim": 7}), tmp_path / "run")
    assert not (tmp_path / "run" / "ckpt").exists()


def test_edm2_networks_train_with_their_log_variance_head():
    """EDM: EDM2's uncertainty-weighted loss; sCT/sCD: the adaptive weight is the network's own head."""
    from cmscale.methods import NetworkLogvar
    from cmscale.models.edm2_loss import EDM2Loss

    edm = build_method(RunConfig(method="edm", budget_iters=1, **BASE), img_channels=1)
    assert isinstance(edm.loss_fn, EDM2Loss)
    sct = build_method(RunConfig(method="sct", budget_iters=1, **BASE), img_channels=1)
    assert isinstance(sct.loss_fn.adaptive_weight, NetworkLogvar) and sct.extra_modules == []
    t = torch.tensor([0.1, 0.7, 1.4])
    with torch.no_grad():
        torch.testing.assert_close(sct.loss_fn.adaptive_weight(t), sct.network.logvar((0.5 * t.tan()).log() / 4))
    head = sct.network.logvar_linear.weight
    before = head.detach().clone()
    torch.manual_seed(0)
    draws = sct.sample_draws((4, 1, 8, 8), torch.device("cpu"))
    sct.loss(torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), **draws).mean().backward()
    assert head.grad is not None and head.grad.abs().max() > 0 and torch.equal(head.detach(), before)


def test_scd_distils_the_teacher_guided_at_a_fixed_scale(runs):
    from cmscale.methods import GuidedTeacher

    root, _ = runs
    checkpoint = str(root / "edm" / "ckpt" / "final.pt")
    config = RunConfig(method="scd", budget_iters=1, teacher_ckpt=checkpoint, teacher_guidance=2.0, **BASE)
    method = build_method(config, img_channels=1)
    assert isinstance(method.teacher, GuidedTeacher)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.3, 0.7, 1.0, 1.3])
    onehot = torch.nn.functional.one_hot(torch.tensor([1, 2, 3, 4]), 10).float()
    with torch.no_grad():
        conditional = method.teacher.teacher.F(x, t, onehot)
        unconditional = method.teacher.teacher.F(x, t, torch.zeros_like(onehot))
        torch.testing.assert_close(method.teacher.F(x, t, onehot), unconditional + 2.0 * (conditional - unconditional))


def test_a_guided_teacher_without_an_unconditional_branch_is_refused(tmp_path):
    from cmscale.methods import TeacherCheckpointError

    teacher = RunConfig(method="edm", budget_iters=1, eval={"at_fractions": []}, **BASE)  # label_dropout 0
    assert train(teacher, tmp_path / "edm")["status"] == "done"
    config = RunConfig(method="scd", budget_iters=1, teacher_ckpt=str(tmp_path / "edm" / "ckpt" / "final.pt"),
                       teacher_guidance=2.0, **BASE)
    with pytest.raises(TeacherCheckpointError, match="never trained its unconditional branch"):
        build_method(config, img_channels=1)
    with pytest.raises(ValueError, match="method 'ect' consults no teacher in its loss"):
        build_method(RunConfig(method="ect", budget_iters=1, teacher_ckpt="x", teacher_guidance=2.0, **BASE), 1)
    with pytest.raises(ValueError, match="label_dim is 0"):
        RunConfig(method="scd", budget_iters=1, teacher_ckpt="x", teacher_guidance=2.0, **{**BASE, "label_dim": 0})


def test_a_latent_space_teacher_on_pixel_data_is_refused(tmp_path):
    from cmscale.methods import TeacherCheckpointError

    config = RunConfig(method="ect", budget_iters=1, teacher_ckpt=str(tmp_path / "t.pt"), **BASE)
    net = build_method(config, img_channels=1, load_weights=False).network
    torch.save({"net": net.state_dict(), "encoder": {"class_name": "StabilityVAEEncoder"}}, tmp_path / "t.pt")
    with pytest.raises(TeacherCheckpointError, match="latent-space network .* this run trains on pixels"):
        build_method(config, img_channels=1)
