"""Evaluation: FID through torch-fidelity in the digits feature space, cached reference statistics,
offline Inception errors, and the eval rows of a tiny ECT run.

Every test shares one cache directory (the digits CNN trains once, a few seconds); tests that
need a cold cache remove the one file they measure.
"""

from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from PIL import Image
from torch_fidelity.utils import create_feature_extractor

from cmscale.accounting import train_flops_at
from cmscale.cli import main
from cmscale.config import RunConfig
from cmscale.data import load_digits
from cmscale.eval import (
    EVAL_ROW_KEYS,
    InceptionWeightsNotFoundError,
    evaluate_model,
    feature_space,
    fid_between,
    fid_to_reference,
    reference_statistics,
)
from cmscale.eval.features import INCEPTION_FILENAME, DigitsFeatureExtractor
from cmscale.eval.fid import noise_floor, scores_to_reference
from cmscale.eval.run import load_run_config_json, model_from_final_checkpoint
from cmscale.methods import network_of
from cmscale.models.flops import forward_flops
from cmscale.rundir import read_json, read_metrics
from cmscale.train import train


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmscale-cache")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("CMSCALE_CACHE_DIR", str(path))
    yield path
    patcher.undo()


@pytest.fixture(scope="session")
def digits():
    return load_digits(16)


@pytest.fixture(scope="session")
def space(eval_cache):
    return feature_space("digits")


@pytest.fixture(scope="session")
def halves(digits):
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    half = len(digits) // 2
    return digits.images[order[:half]], digits.images[order[half:]]


def add_noise(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    """Gaussian noise of ``std`` in the [-1, 1] pixel scale, re-quantised to uint8."""
    x = images.float() / 127.5 - 1 + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ExtractorCalls:
    """Counts forward passes of the digits extractor, wherever torch-fidelity creates it."""

    def __init__(self):
        self.images = 0
        self._lock = threading.Lock()

    def __call__(self, module, args, output):
        if isinstance(module, DigitsFeatureExtractor):
            with self._lock:
                self.images += args[0].shape[0]

    def __enter__(self):
        self._handle = torch.nn.modules.module.register_module_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_fid_of_training_set_to_its_own_stats_is_zero_and_halves_are_small_positive(digits, space, halves):
    reference, _ = reference_statistics(digits, space)
    self_fid = fid_to_reference(digits.images, reference)
    halves_fid = fid_between(*halves, space)
    noisy_fid = fid_between(halves[0], add_noise(halves[1], 0.4), space)
    assert abs(self_fid) < 1e-3 * halves_fid
    # Two samples of one distribution: positive (finite-sample bias of 64-d covariances from ~900
    # images) but well below the same comparison against a visibly noisy half.
    assert 0 < halves_fid < 0.6 * noisy_fid


def test_fid_rises_monotonically_with_gaussian_noise(digits, space):
    reference, _ = reference_statistics(digits, space)
    fids = [fid_to_reference(add_noise(digits.images, std), reference) for std in (0.0, 0.05, 0.1, 0.2)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_kid_is_near_zero_for_real_images_and_rises_with_noise(digits, space):
    reference, _ = reference_statistics(digits, space)
    real, mild, strong = (scores_to_reference(add_noise(digits.images[::2], std), reference, kid_subsets=50)
                          for std in (0.0, 0.2, 0.4))
    # KID estimates MMD^2 without FID's finite-sample bias: near 0 for half of the reference
    # itself (slightly negative: the half overlaps the reference), and it grows with corruption.
    assert abs(real.kid) < 0.15 * strong.kid
    assert real.kid < mild.kid < strong.kid and real.kid_std > 0
    assert scores_to_reference(digits.images[::2], reference).kid is None  # kid_subsets=0: FID only


def test_noise_floor_is_fid_between_disjoint_real_samples_and_shrinks_with_the_sample_count(digits, space):
    small, large = (noise_floor(digits, space, n, repeats=3, kid_subsets=10) for n in (100, 400))
    # Real against real: FID's finite-sample bias only, roughly proportional to 1/num_samples.
    assert small.fid_mean > 2 * large.fid_mean > 0 and small.fid_std > 0
    assert large.reference_size == len(digits) - 400 and large.repeats == 3
    assert noise_floor(digits, space, 400, repeats=3, kid_subsets=10) == large  # seeded
    with pytest.raises(ValueError, match="half of the"):
        noise_floor(digits, space, len(digits))


def frechet_distance_direct(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Reference formula in float64: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a, sigma_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * covmean))


def test_torch_fidelity_fid_matches_direct_frechet_distance_on_the_same_features(digits, space, halves):
    extractor = create_feature_extractor(space.registered_name, [space.layer], cuda=False,
                                         feature_extractor_weights_path=str(space.weights_path), verbose=False)
    noisy = add_noise(digits.images, 0.1)
    with torch.no_grad():
        features_a = extractor(halves[0])[0].double().numpy()
        features_b = extractor(noisy)[0].double().numpy()
    direct = frechet_distance_direct(features_a, features_b)
    via_fidelity = fid_between(halves[0], noisy, space)
    assert direct > 1.0
    assert via_fidelity == pytest.approx(direct, rel=1e-4)


def test_reference_statistics_are_cached_and_the_extractor_is_not_run_again(digits, space):
    reference, _ = reference_statistics(digits, space)
    reference.stats_path.unlink()
    with ExtractorCalls() as calls:
        _, first = reference_statistics(digits, space)
    assert calls.images == len(digits) and reference.stats_path.is_file()
    with ExtractorCalls() as calls:
        _, second = reference_statistics(digits, space)
        fid_to_reference(digits.images[:100], reference)
    assert calls.images == 100  # only the 100 generated images went through the extractor
    np.testing.assert_array_equal(first["mu"], second["mu"])
    np.testing.assert_array_equal(first["sigma"], second["sigma"])


def test_concurrent_jobs_compute_reference_statistics_once(digits, space):
    reference, expected = reference_statistics(digits, space)
    reference.stats_path.unlink()
    results, errors = [], []

    def job():
        try:
            results.append(reference_statistics(digits, space)[1])
        except Exception as error:  # surfaced below
            errors.append(error)

    with ExtractorCalls() as calls:
        threads = [threading.Thread(target=job) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert calls.images == len(digits)  # one pass over the data, not four
    for stats in results:
        np.testing.assert_allclose(stats["sigma"], expected["sigma"], rtol=1e-6, atol=1e-9)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch-hub and cmscale caches, and any network connection fails loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("CMSCALE_CACHE_DIR", str(tmp_path / "cmscale-cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def refuse(*args, **kwargs):
        raise AssertionError("evaluation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tmp_path


def test_missing_inception_weights_raise_the_documented_error_offline(offline):
    with pytest.raises(InceptionWeightsNotFoundError) as caught:
        feature_space("cifar10")
    message = str(caught.value)
    assert str(offline / "torch-home" / "hub" / "checkpoints" / INCEPTION_FILENAME) in message
    assert str(offline / "cmscale-cache" / "weights" / INCEPTION_FILENAME) in message
    assert "--inception-weights" in message and "eval.inception_weights" in message
    given = offline / "nowhere.pth"
    with pytest.raises(InceptionWeightsNotFoundError, match=str(given)):
        feature_space("cifar10", inception_weights=given)
    # Through evaluate_model the error comes before the (absent) dataset is read.
    config = RunConfig(method="edm", preset="xxs", dataset="cifar10", data_path=str(offline / "no-cifar"),
                       resolution=32, budget_iters=1)
    with pytest.raises(InceptionWeightsNotFoundError):
        evaluate_model(config, model=None, step=1, train_flops=0.0, images_seen=0, run_dir=offline / "run")


# ----------------------------------------------------------------------------------------------
# Evals during a tiny training run


TINY = {"preset": "xxs", "dataset": "digits", "resolution": 16, "batch_size": 16, "lr": 2e-3,
        "ema_rates": [0.9], "log_every": 1, "ckpt_every": 100, "heartbeat_s": 60.0, "device": "cpu"}
NUM_SAMPLES = 80


@pytest.fixture(scope="module")
def tiny_runs(eval_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    teacher = RunConfig(method="edm", budget_iters=3, **TINY, edm={"heun_steps": [2]},
                        eval={"at_fractions": [1.0], "num_samples": 32, "batch_size": 32})
    train(teacher, root / "teacher")
    student = RunConfig(method="ect", budget_iters=4, teacher_ckpt=str(root / "teacher" / "ckpt" / "final.pt"), **TINY,
                        eval={"at_fractions": [0.5, 1.0], "num_samples": NUM_SAMPLES, "batch_size": 48})
    done = train(student, root / "ect")
    assert done["status"] == "done", done
    return root, teacher, student


def test_tiny_ect_run_writes_the_expected_eval_rows(tiny_runs):
    root, _, student = tiny_runs
    run_dir = root / "ect"
    resolved = read_json(run_dir / "config.json")
    rows = read_metrics(run_dir / "metrics.jsonl", kind="eval")
    fwd = resolved["flops_per_image_forward"]
    assert [(row["step"], row["sampler_steps"]) for row in rows] == [(2, 1), (2, 2), (4, 1), (4, 2)]
    references = {row["reference"] for row in rows}
    assert len(references) == 1 and next(iter(references)).startswith("digits-r16-")
    for row in rows:
        assert tuple(row) == EVAL_ROW_KEYS
        assert row["kind"] == "eval" and row["extractor"] == "digits-cnn"
        assert row["nfe"] == row["sampler_steps"]
        assert row["sampling_flops_per_image"] == row["nfe"] * fwd
        # ECT's step cost depends on its stage (the target pass runs on the rows with r > 0 only)
        assert row["train_flops"] == train_flops_at(student, row["step"])
        assert row["images_seen"] == row["step"] * student.batch_size
        assert row["num_samples"] == NUM_SAMPLES
        assert np.isfinite(row["kid"]) and row["kid_std"] >= 0
        assert np.isfinite(row["fid"]) and row["fid"] > 0 and row["wall_s"] > 0
    # The xxs UNet on one 16x16 grey image: the counted FLOPs the eval rows multiply.
    model, _ = model_from_final_checkpoint(student, run_dir / "ckpt" / "final.pt", torch.device("cpu"))
    assert fwd == forward_flops(network_of(model))
    grid = Image.open(run_dir / "samples" / "step00000004-2steps.png")
    assert grid.size == (8 * 17 + 1, 8 * 17 + 1)  # 64 of the 80 samples, 16 px plus 1 px padding
    assert len(list((run_dir / "samples").glob("*.png"))) == 4


def test_teacher_eval_uses_heun_nfe(tiny_runs):
    root, _, _ = tiny_runs
    resolved = read_json(root / "teacher" / "config.json")
    rows = read_metrics(root / "teacher" / "metrics.jsonl", kind="eval")
    assert [(row["step"], row["sampler_steps"], row["nfe"]) for row in rows] == [(3, 2, 3)]  # NFE = 2N - 1
    assert rows[0]["sampling_flops_per_image"] == 3 * resolved["flops_per_image_forward"]


def test_eval_is_reproducible_and_leaves_the_training_rng_alone(tiny_runs):
    root, _, _ = tiny_runs
    config, _ = load_run_config_json(root / "ect")
    config = config.model_copy(update={"eval": config.eval.model_copy(update={"cm_steps": [1], "grid_images": 0})})
    model, _ = model_from_final_checkpoint(config, root / "ect" / "ckpt" / "final.pt", torch.device("cpu"))
    rng = torch.get_rng_state()
    first = evaluate_model(config, model, step=4, train_flops=0.0, images_seen=0, run_dir=root / "scratch")
    assert torch.equal(torch.get_rng_state(), rng)
    second = evaluate_model(config, model, step=4, train_flops=0.0, images_seen=0, run_dir=root / "scratch")
    assert first[0]["fid"] == second[0]["fid"]


def test_cli_eval_appends_rows_equal_to_the_final_training_eval(tiny_runs):
    root, _, _ = tiny_runs
    run_dir = root / "ect"
    before = read_metrics(run_dir / "metrics.jsonl", kind="eval")
    result = CliRunner().invoke(main, ["eval", "ect", "--root", str(root), "--steps", "1,2",
                                       "--num-samples", str(NUM_SAMPLES), "--batch-size", "48", "--json"])
    assert result.exit_code == 0, result.output
    after = read_metrics(run_dir / "metrics.jsonl", kind="eval")
    assert after[: len(before)] == before and len(after) == len(before) + 2
    # Same EMA weights, seed, sample count and batches as the trainer's eval at the final step.
    final_rows = [row for row in before if row["step"] == 4]
    for ours, trainers in zip(after[len(before):], final_rows):
        assert {k: v for k, v in ours.items() if k != "wall_s"} == {k: v for k, v in trainers.items() if k != "wall_s"}
    assert json.loads(result.output)[0]["sampler_steps"] == 1


def test_cli_eval_reports_missing_inception_weights(offline):
    run_dir = offline / "cifar-run"
    run_dir.mkdir()
    config = RunConfig(method="edm", preset="xxs", dataset="cifar10", data_path=str(offline / "no-cifar"),
                       resolution=32, budget_iters=1)
    (run_dir / "config.json").write_text(json.dumps(config.model_dump(mode="json") | {"flops_per_step": 1.0}))
    given = offline / "none.pth"
    result = CliRunner().invoke(main, ["eval", str(run_dir), "--inception-weights", str(given)])
    assert result.exit_code == 1
    assert f"Inception weights not found at {given}" in result.output


@pytest.mark.parametrize(
    "method,with_teacher", [("edm", False), ("ect", True), ("sct", False), ("sct", True), ("scd", True)]
)
def test_final_checkpoint_rebuilds_the_training_wrapper(tmp_path, method, with_teacher):
    from cmscale.methods import build_method
    from cmscale.models.presets import build_unet

    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.pt"
    torch.save({"net": build_unet("xxs", 16, 1).state_dict()}, teacher_path)
    config = RunConfig(
        method=method, preset="xxs", budget_iters=10, teacher_ckpt=str(teacher_path) if with_teacher else None
    )
    trained = build_method(config, 1).model.eval()
    with torch.no_grad():  # move the weights off the teacher's, so a wrong load would show
        for parameter in trained.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    final = tmp_path / "final.pt"
    torch.save({"net": network_of(trained).state_dict(), "step": 10, "img_channels": 1}, final)
    rebuilt, _ = model_from_final_checkpoint(config, final, torch.device("cpu"))
    x = torch.randn(3, 1, 16, 16)
    time_or_sigma = torch.tensor([0.3, 1.0, 1.4]) if method in ("sct", "scd") else torch.tensor([0.01, 1.0, 80.0])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, time_or_sigma), trained(x, time_or_sigma), rtol=0, atol=0)
