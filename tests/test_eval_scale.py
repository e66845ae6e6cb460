"""Evaluation at scale: reference statistics from a streamed image set, published reference files,
and FID features written in shards across tasks."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from cmscale.data import ArchiveDataset, load_dataset, load_digits
from cmscale.eval import feature_space, reference_statistics


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmscale-cache")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("CMSCALE_CACHE_DIR", str(path))
    yield path
    patcher.undo()


@pytest.fixture(scope="module")
def space(eval_cache):
    return feature_space("digits")


def write_digits_zip(path, count: int = 300):
    images = load_digits(16).images[:count]
    with zipfile.ZipFile(path, "w") as archive:
        for index, image in enumerate(images):
            buffer = io.BytesIO()
            Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
            archive.writestr(f"00000/img{index:08d}.png", buffer.getvalue())
    return path


def test_reference_statistics_of_a_streamed_set_equal_those_of_the_same_images_in_memory(
        tmp_path, space, monkeypatch):
    path = write_digits_zip(tmp_path / "digits.zip")
    held = load_dataset("imagefolder", path=path)
    monkeypatch.setenv("CMSCALE_DATA_IN_MEMORY_BYTES", "0")
    streamed = load_dataset("imagefolder", path=path)
    assert isinstance(streamed, ArchiveDataset)
    _, from_memory = reference_statistics(held, space)
    _, from_stream = reference_statistics(streamed, space)
    np.testing.assert_allclose(from_stream["mu"], from_memory["mu"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(from_stream["sigma"], from_memory["sigma"], rtol=1e-6, atol=1e-6)


# -- 50k samples across tasks: shards of features, reduced ------------------------------------------

SHARD_CONFIG = {"method": "sct", "preset": "t2", "dataset": "digits", "resolution": 8, "budget_iters": 1,
                "device": "cpu", "eval": {"batch_size": 16, "num_samples": 64, "cm_steps": [1]}}


@pytest.fixture(scope="module")
def shard_setup(space):
    import torch

    from cmscale.config import RunConfig
    from cmscale.eval.fid import reference_statistics
    from cmscale.methods import build_method, network_of

    config = RunConfig(**SHARD_CONFIG)
    torch.manual_seed(0)
    model = build_method(config, 1).model.eval()
    reference, _ = reference_statistics(load_digits(8), space)
    return config, model, network_of(model).img_channels, reference


def _write(config, model, channels, space, folder, shard):
    import torch

    from cmscale.eval.fid import to_uint8
    from cmscale.eval.shards import ShardPlan, write_shard

    plan = ShardPlan(folder, config.eval.num_samples, config.eval.batch_size, steps=1)
    return plan, write_shard(config, model, plan, shard, space, to_uint8, torch.device("cpu"), channels)


def test_a_sharded_evaluation_equals_an_unsharded_one_on_the_same_samples(tmp_path, space, shard_setup):
    import torch

    from cmscale.eval.fid import scores_to_reference, to_uint8
    from cmscale.eval.shards import chunk_seed, reduce_shards
    from cmscale.sampling import sample

    config, model, channels, reference = shard_setup
    whole, written = _write(config, model, channels, space, tmp_path / "one", (0, 1))
    assert written == [0, 1, 2, 3]
    for index in range(3):
        split, _ = _write(config, model, channels, space, tmp_path / "three", (index, 3))
    for chunk in range(4):
        assert np.array_equal(np.load(split.chunk_path(chunk)), np.load(whole.chunk_path(chunk)))
    (fid_split, nfe), (fid_whole, _) = reduce_shards(split, reference, kid_subsets=5), reduce_shards(whole, reference)
    assert fid_split.fid == fid_whole.fid and nfe == 1 and fid_whole.kid is None
    # The same samples scored in one torch-fidelity call (calculate_metrics against the cached statistics).
    images = torch.cat([to_uint8(sample(config, model, (16, channels, 8, 8), 1,
                                        torch.Generator().manual_seed(chunk_seed(config.eval.seed, k)), "cpu")[0])
                        for k in range(4)])
    unsharded = scores_to_reference(images, reference, kid_subsets=5)
    assert fid_split.fid == pytest.approx(unsharded.fid, rel=1e-5)
    assert (fid_split.kid, fid_split.kid_std) == pytest.approx((unsharded.kid, unsharded.kid_std), rel=1e-5)


def test_an_interrupted_sharded_evaluation_resumes_from_its_finished_chunks(tmp_path, space, shard_setup):
    from cmscale.eval.shards import ShardError, reduce_shards

    config, model, channels, reference = shard_setup
    plan, written = _write(config, model, channels, space, tmp_path, (1, 2))
    assert written == [1, 3]
    with pytest.raises(ShardError, match=r"2 of 4 chunks have no features yet \(chunks 0, 2; chunk k belongs to"):
        reduce_shards(plan, reference)
    plan.chunk_path(3).unlink()  # killed while writing chunk 3
    assert _write(config, model, channels, space, tmp_path, (1, 2))[1] == [3]
    assert _write(config, model, channels, space, tmp_path, (0, 2))[1] == [0, 2]
    assert reduce_shards(plan, reference)[0].fid > 0
    other = config.model_copy(update={"eval": config.eval.model_copy(update={"seed": 5})})
    with pytest.raises(ShardError, match="other settings \\(seed\\)"):
        _write(other, model, channels, space, tmp_path, (0, 2))


def test_the_chunks_of_fifty_thousand_samples_are_class_balanced():
    from cmscale.sampling import balanced_labels

    labels = np.concatenate([balanced_labels(start, 250, 1000, "cpu").numpy() for start in range(0, 50_000, 250)])
    assert np.bincount(labels, minlength=1000).tolist() == [50] * 1000
    assert balanced_labels(0, 4, 0, "cpu") is None


# -- published reference statistics -------------------------------------------------------------------


def test_published_npz_and_pkl_references_are_read_without_running_code(tmp_path, space, shard_setup):
    import pickle

    import torch

    from cmscale.eval.fid import features_of, fid_to_reference, fid_to_stats
    from cmscale.eval.reference import ReferenceStatsError, read_reference_stats

    _, _, _, reference = shard_setup
    _, stats = reference_statistics(reference.data, space)
    np.savez(tmp_path / "digits-8x8.npz", mu=stats["mu"], sigma=stats["sigma"])  # EDM's fid-refs layout
    with open(tmp_path / "img8.pkl", "wb") as handle:  # EDM2's dataset-refs layout
        pickle.dump({"fid": {"mu": stats["mu"], "sigma": stats["sigma"]}, "fd_dinov2": {}}, handle)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    expected = fid_to_reference(images, reference)
    for name in ("digits-8x8.npz", "img8.pkl"):
        published = read_reference_stats(tmp_path / name, space, pixel_resolution=8)
        assert fid_to_stats(features_of(images, space), published.stats()) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ReferenceStatsError, match=r"img8.pkl: statistics of 8x8 images .* samples are 64x64"):
        read_reference_stats(tmp_path / "img8.pkl", space, pixel_resolution=64)
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ReferenceStatsError, match="inception.npz: statistics of 2048-d features.*another feature"):
        read_reference_stats(tmp_path / "inception.npz", space, pixel_resolution=8)

    class Payload:
        def __reduce__(self):
            return (print, ("the pickle ran code",))

    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"mu": Payload()}, handle)
    with pytest.raises(ReferenceStatsError, match="evil.pkl: refusing to load builtins.print"):
        read_reference_stats(tmp_path / "evil.pkl", space, pixel_resolution=8)


def test_an_eval_too_large_to_hold_scores_the_same_samples_from_their_features(tmp_path, space, shard_setup,
                                                                                monkeypatch):
    from cmscale.eval import run

    config, model, _, _ = shard_setup
    config = config.model_copy(update={"eval": config.eval.model_copy(update={"kid_subsets": 2, "grid_images": 4})})
    held = run.evaluate_model(config, model, step=1, train_flops=0.0, images_seen=0, run_dir=tmp_path / "a")
    monkeypatch.setattr(run, "MAX_SAMPLE_BYTES", 0)
    streamed = run.evaluate_model(config, model, step=1, train_flops=0.0, images_seen=0, run_dir=tmp_path / "b")
    assert streamed[0]["fid"] == pytest.approx(held[0]["fid"], rel=1e-5)
    assert held[0]["kid"] is not None and streamed[0]["kid"] is None
    grids = [(tmp_path / name / "samples" / "step00000001-1steps.png").read_bytes() for name in ("a", "b")]
    assert grids[0] == grids[1]


def test_cli_eval_in_shards_then_reduce_appends_the_eval_rows(tmp_path, space):
    from click.testing import CliRunner

    from cmscale.cli import main
    from cmscale.config import RunConfig
    from cmscale.rundir import read_metrics
    from cmscale.train import train

    config = RunConfig(**{**SHARD_CONFIG, "budget_iters": 2, "batch_size": 8,
                          "eval": {**SHARD_CONFIG["eval"], "kid_subsets": 2, "grid_images": 0}})
    run_dir = tmp_path / "run"
    assert train(config, run_dir)["status"] == "done"
    runner = CliRunner()
    reduce = ["eval", str(run_dir), "--num-samples", "40", "--reduce"]
    early = runner.invoke(main, reduce)
    assert early.exit_code != 0 and "3 chunks have no features yet" in early.output
    for index in range(2):
        result = runner.invoke(main, ["eval", str(run_dir), "--num-samples", "40", "--shard", f"{index}/2"])
        assert result.exit_code == 0, result.output
    assert "0 still missing" in result.output
    result = runner.invoke(main, [*reduce, "--json"])
    assert result.exit_code == 0, result.output
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl")
            if row["kind"] == "eval" and row["num_samples"] == 40]
    assert len(rows) == 1 and rows[0]["fid"] > 0 and rows[0]["kid"] is not None and rows[0]["nfe"] == 1
    assert rows[0]["sampling_flops_per_image"] > 0


def test_a_reference_of_another_resolution_or_extractor_fails_before_training(tmp_path, space):
    import pickle

    from cmscale.config import RunConfig
    from cmscale.eval.reference import ReferenceStatsError
    from cmscale.train import train

    base = {**SHARD_CONFIG, "budget_iters": 2}
    with open(tmp_path / "img64.pkl", "wb") as handle:
        pickle.dump({"fid": {"mu": np.zeros(64), "sigma": np.eye(64)}}, handle)
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    write_digits_zip(tmp_path / "digits16.zip", 10)
    cases = [("img64.pkl", "statistics of 64x64 images .* samples are 8x8"),
             ("inception.npz", "2048-d features, but digits-cnn gives 64-d"),
             ("digits16.zip", "digits16.zip holds pixels of 1x16x16, but this run.s samples are 8x8 images")]
    for name, message in cases:
        run_dir = tmp_path / f"run-{name}"
        with pytest.raises(ReferenceStatsError, match=message):
            train(RunConfig(**base, fid_reference=str(tmp_path / name)), run_dir)
        assert not run_dir.exists()
