"""Streaming EDM-format data sets: what the workers deliver, its order, labels, resumption, memory."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cmscale.data import ArchiveDataset, DataFormatError, describe_storage, load_dataset, load_digits
from cmscale.data.latents import LatentScaling
from cmscale.data.loader import StepBatches, step_seed


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def member(index: int, stem: str = "img", suffix: str = "png") -> str:
    text = f"{index:08d}"
    return f"{text[:5]}/{stem}{text}.{suffix}"


def write_zip(path, count: int, side: int = 8, num_classes: int = 7, labels: bool = True):
    """Image i is filled with value i % 251 in channel 0 and i // 251 in channel 1; its label is i % num_classes."""
    entries = []
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(count):
            array = np.zeros((side, side, 3), np.uint8)
            array[..., 0], array[..., 1] = index % 251, index // 251
            archive.writestr(member(index), png_bytes(array))
            entries.append([member(index), index % num_classes])
        archive.writestr("dataset.json", json.dumps({"labels": entries if labels else None}))
    return path


def item_ids(images: torch.Tensor) -> list[int]:
    """The index written into each image by write_zip, read back from floats in [-1, 1]."""
    pixels = ((images[:, :2, 0, 0] + 1) * 127.5).round().long()
    return (pixels[:, 0] + 251 * pixels[:, 1]).tolist()


@pytest.fixture
def streamed(tmp_path, monkeypatch):
    monkeypatch.setenv("CMSCALE_DATA_IN_MEMORY_BYTES", "0")
    return load_dataset("imagefolder", path=write_zip(tmp_path / "set.zip", 60))


def test_large_folder_is_streamed_small_one_held_and_the_log_line_says_which(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "set.zip", 12)
    held = load_dataset("imagefolder", path=path)
    assert "held in memory" in describe_storage(held) and held.label_dim == 7
    monkeypatch.setenv("CMSCALE_DATA_IN_MEMORY_BYTES", "0")
    data = load_dataset("imagefolder", path=path)
    assert isinstance(data, ArchiveDataset)
    line = describe_storage(data, workers=2)
    assert "streamed by 2 DataLoader workers" in line and "in-memory limit" in line and "7 classes" in line
    assert torch.equal(torch.stack([torch.from_numpy(data[i]) for i in range(len(data))]), held.images)


def test_streamed_images_are_resized_to_the_runs_resolution_as_the_in_memory_path_does(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "set.zip", 12)
    held = load_dataset("imagefolder", path=path, resolution=16)
    monkeypatch.setenv("CMSCALE_DATA_IN_MEMORY_BYTES", "0")
    batches = StepBatches(load_dataset("imagefolder", path=path, resolution=16), batch_size=4, seed=0, num_workers=0)
    assert torch.equal(batches(1), held.batch(batches.indices(1)))


def test_workers_deliver_the_scheduled_items_with_their_labels(streamed):
    batches = StepBatches(streamed, batch_size=8, seed=3, num_workers=1)
    for step in range(3):
        images, labels = batches.batch(step)
        assert images.dtype == torch.float32 and images.shape == (8, 3, 8, 8)
        assert item_ids(images) == batches.indices(step).tolist()
        assert labels.dtype == torch.int64 and labels.tolist() == [i % 7 for i in item_ids(images)]
    assert batches.label_dim == 7


def test_an_epoch_visits_every_item_once_and_the_order_depends_on_seed_and_epoch(streamed):
    batches = StepBatches(streamed, batch_size=10, seed=0, num_workers=0)
    first_epoch = [i for step in range(6) for i in batches.indices(step).tolist()]
    second_epoch = [i for step in range(6, 12) for i in batches.indices(step).tolist()]
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(60))
    assert first_epoch != second_epoch
    other_seed = StepBatches(streamed, batch_size=10, seed=1, num_workers=0)
    assert [i for step in range(6) for i in other_seed.indices(step).tolist()] != first_epoch


def test_ranks_read_disjoint_shards_that_make_up_the_single_process_batch(streamed):
    whole = StepBatches(streamed, batch_size=12, seed=5, num_workers=0)
    ranks = [StepBatches(streamed, batch_size=12, seed=5, rank=r, world=3, num_workers=0) for r in range(3)]
    for step in (0, 4, 9):  # step 4 crosses an epoch boundary (60 items, 12 a step)
        shards = [rank.indices(step) for rank in ranks]
        assert torch.equal(torch.cat(shards), whole.indices(step))
        assert item_ids(ranks[1](step)) == shards[1].tolist()


def test_a_resumed_run_continues_the_same_sequence_of_batches(streamed):
    uninterrupted = StepBatches(streamed, batch_size=8, seed=11, num_workers=1)
    expected = [(uninterrupted(step), uninterrupted.labels(step)) for step in range(12)]
    uninterrupted.close()
    # A run stopped after step 6 and resumed from its checkpoint: a fresh loader starting at step 7.
    resumed = StepBatches(streamed, batch_size=8, seed=11, num_workers=1)
    for step in range(7, 12):
        images, labels = resumed.batch(step)
        assert torch.equal(images, expected[step][0]) and torch.equal(labels, expected[step][1])


def test_in_memory_labels_are_the_rows_of_the_images():
    data = load_digits(8)
    batches = StepBatches(data, batch_size=16, seed=0)
    assert batches.label_dim == data.label_dim == 10
    indices = batches.indices(2)
    assert torch.equal(batches(2), data.batch(indices))
    assert torch.equal(batches.labels(2), data.labels[indices])


def test_an_unlabelled_set_has_label_dim_zero_and_no_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("CMSCALE_DATA_IN_MEMORY_BYTES", "0")
    data = load_dataset("imagefolder", path=write_zip(tmp_path / "set.zip", 10, labels=False))
    assert data.label_dim == 0 and StepBatches(data, 4, 0, num_workers=0).labels(0) is None


def test_latent_zip_batches_are_posterior_draws_in_edm2_scaling(tmp_path):
    path = tmp_path / "latents.zip"
    rng = np.random.default_rng(0)
    stored = rng.normal(size=(6, 8, 4, 4)).astype(np.float32)
    stored[:, 4:] = np.abs(stored[:, 4:])  # std
    with zipfile.ZipFile(path, "w") as archive:
        for index, array in enumerate(stored):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(member(index, "img-mean-std-", "npy"), buffer.getvalue())
        archive.writestr("dataset.json", json.dumps({"labels": [[member(i, "img-mean-std-", "npy"), i % 2]
                                                                for i in range(6)]}))
    with pytest.raises(DataFormatError, match="latents.zip holds VAE latents .*set vae_path to the VAE folder"):
        load_dataset("imagefolder", path=path, resolution=4)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    data = load_dataset("imagefolder", path=path, resolution=4, vae_path=vae)
    assert data.kind == "latents" and data.channels == 4 and data.resolution == 4 and data.label_dim == 2
    assert "always streamed" in describe_storage(data)
    batches = StepBatches(data, batch_size=3, seed=2, num_workers=0)
    latents = batches(1)
    generator = torch.Generator().manual_seed(step_seed(2, 1, 0) ^ 0x5EED_1A7E)
    expected = LatentScaling().sample(torch.from_numpy(stored[batches.indices(1).numpy()]), generator)
    assert torch.equal(latents, expected)
    with pytest.raises(DataFormatError, match="resolution = 32"):
        load_dataset("imagefolder", path=path, resolution=32, vae_path=vae)


# -- bad input: the error names the file and the fix, before any step ----------------------------


def test_malformed_dataset_json_names_the_file_and_the_format(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member(0), png_bytes(np.zeros((8, 8, 3), np.uint8)))
        archive.writestr("dataset.json", "{labels: oops")
    with pytest.raises(DataFormatError, match=r"dataset.json inside .*bad.zip is malformed.*dataset_tool.py"):
        load_dataset("imagefolder", path=path)


def test_dataset_json_without_a_label_for_an_image_names_the_image(tmp_path):
    path = tmp_path / "partial.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(2):
            archive.writestr(member(index), png_bytes(np.zeros((8, 8, 3), np.uint8)))
        archive.writestr("dataset.json", json.dumps({"labels": [[member(0), 1]]}))
    with pytest.raises(DataFormatError, match=f"no label for {member(1)}"):
        load_dataset("imagefolder", path=path)


def test_images_of_mixed_sizes_are_refused_naming_both_files(tmp_path):
    path = tmp_path / "mixed.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(5):
            side = 16 if index == 4 else 8
            archive.writestr(member(index), png_bytes(np.zeros((side, side, 3), np.uint8)))
    with pytest.raises(DataFormatError, match=f"{member(4)} is 3x16x16 but {member(0)} is 3x8x8.*resize"):
        load_dataset("imagefolder", path=path)


def test_a_file_that_is_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "images.tar"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="neither a folder nor a zip"):
        load_dataset("imagefolder", path=path)


# -- the memory bound ------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_streaming_200k_images_grows_resident_memory_by_less_than_500_mb(tmp_path, monkeypatch):
    monkeypatch.setenv("CMSCALE_DATA_IN_MEMORY_BYTES", "0")
    count, path = 200_000, tmp_path / "big.zip"
    # One 64x64 PNG under every name (the reader does not know they are equal): a 200k-member zip in seconds.
    payload = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(count):
            archive.writestr(member(index), payload)
        archive.writestr("dataset.json", json.dumps({"labels": [[member(i), i % 1000] for i in range(count)]}))
    before = _rss_bytes(os.getpid())
    data = load_dataset("imagefolder", path=path)
    batches = StepBatches(data, batch_size=500, seed=0, num_workers=2)
    peak_main, worker_start, worker_peak = 0, {}, {}
    seen = 0
    for step in range(count // 500):
        images, labels = batches.batch(step)
        seen += images.shape[0]
        if step % 20 == 0:
            peak_main = max(peak_main, _rss_bytes(os.getpid()))
            for child in _children(os.getpid()):
                try:
                    rss = _rss_bytes(child)
                except OSError:
                    continue
                worker_start.setdefault(child, rss)
                worker_peak[child] = max(worker_peak.get(child, 0), rss)
    assert seen == count and labels.shape == (500,) and data.label_dim == 1000
    growth = {child: (peak - worker_start[child]) / 2**20 for child, peak in worker_peak.items()}
    print(f"main process grew {(peak_main - before) / 2**20:.0f} MiB; workers {sorted(growth.values())} MiB")
    assert peak_main - before < 500 * 2**20, f"main process grew by {(peak_main - before) / 2**20:.0f} MiB"
    for child, peak in worker_peak.items():
        grown = peak - worker_start[child]
        assert grown < 500 * 2**20, f"worker grew by {grown / 2**20:.0f} MiB"


def test_a_trainer_resumed_from_a_checkpoint_ends_where_the_uninterrupted_streamed_run_ends(tmp_path, monkeypatch):
    from cmscale.config import RunConfig
    from cmscale.train import train

    monkeypatch.setenv("CMSCALE_DATA_IN_MEMORY_BYTES", "0")
    monkeypatch.setenv("CMSCALE_DATA_WORKERS", "1")
    monkeypatch.setenv("CMSCALE_NUM_THREADS", "1")
    path = write_zip(tmp_path / "set.zip", 20, side=8)
    config = RunConfig(method="edm", preset="t2", dataset="imagefolder", data_path=str(path), resolution=8,
                       batch_size=6, budget_iters=7, ckpt_every=4, log_every=1, device="cpu",
                       eval={"at_fractions": []})
    assert train(config, tmp_path / "whole")["status"] == "done"
    resumed = tmp_path / "resumed"
    assert train(config, resumed)["status"] == "done"
    # As if killed after its step-4 checkpoint: steps 5..7 run again from a fresh loader at step 5.
    (resumed / "done.json").unlink()
    (resumed / "ckpt" / "final.pt").unlink()
    os.replace(resumed / "ckpt" / "previous.pt", resumed / "ckpt" / "latest.pt")
    assert torch.load(resumed / "ckpt" / "latest.pt", weights_only=True)["step"] == 4
    assert train(config, resumed)["status"] == "done"
    weights = [torch.load(run / "ckpt" / "final.pt", weights_only=True)["net"] for run in (tmp_path / "whole", resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_cpu_runs_pixels_come_from_the_workers_as_floats_in_shared_memory(tmp_path, monkeypatch):
    # The main process then makes no batch-sized allocation per step (see cmscale.data.loader):
    # a freed 24 MB block a step is what grew its heap by 3 GB over a 200k-image epoch.
    path = write_zip(tmp_path / "set.zip", 12)
    held = load_dataset("imagefolder", path=path, resolution=16)
    monkeypatch.setenv("CMSCALE_DATA_IN_MEMORY_BYTES", "0")
    batches = StepBatches(load_dataset("imagefolder", path=path, resolution=16), batch_size=4, seed=0, num_workers=1)
    for step in range(3):
        images = batches(step)
        assert images.is_shared() and images.dtype == torch.float32
        assert torch.equal(images, held.batch(batches.indices(step)))
