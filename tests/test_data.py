"""Dataset readers on tiny files written in the real formats; nothing is downloaded."""

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cmscale.data import DatasetNotFoundError, load_dataset, load_digits


def test_digits_shape_range_and_labels():
    data = load_dataset("digits", resolution=16)
    images = data.as_float()
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() == -1 and images.max() > 0.9
    assert sorted(set(data.labels.tolist())) == list(range(10))


def _write_cifar_batch(path, images, labels):
    with open(path, "wb") as handle:
        pickle.dump({"data": images.reshape(len(images), -1), "labels": list(labels)}, handle)


def test_cifar10_reader_on_pickle_layout(tmp_path):
    rng = np.random.default_rng(0)
    all_images, all_labels = [], []
    for i in range(1, 6):
        images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3)
        _write_cifar_batch(tmp_path / f"data_batch_{i}", images, labels)
        all_images.append(images)
        all_labels.extend(labels.tolist())
    _write_cifar_batch(tmp_path / "test_batch", all_images[0], all_labels[:3])
    data = load_dataset("cifar10", path=tmp_path)
    assert data.images.shape == (15, 3, 32, 32)
    assert data.labels.tolist() == all_labels
    np.testing.assert_array_equal(data.images.numpy(), np.concatenate(all_images))
    floats = data.as_float()
    assert floats.min() >= -1 and floats.max() <= 1
    assert load_dataset("cifar10", path=tmp_path, split="test").images.shape == (3, 3, 32, 32)


def _write_pngs(folder, count):
    rng = np.random.default_rng(1)
    names = []
    for i in range(count):
        name = f"00000/img{i:08d}.png"
        (folder / "00000").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def test_imagefolder_and_zip_with_dataset_json(tmp_path):
    folder = tmp_path / "images"
    names = _write_pngs(folder, 4)
    labels = [3, 1, 4, 1]
    (folder / "dataset.json").write_text(json.dumps({"labels": [[n, l] for n, l in zip(names, labels)]}))
    from_folder = load_dataset("imagefolder", path=folder)
    assert from_folder.images.shape == (4, 3, 8, 8)
    assert from_folder.labels.tolist() == labels

    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in folder.rglob("*"):
            if path.is_file():
                handle.write(path, path.relative_to(folder).as_posix())
    from_zip = load_dataset("imagefolder", path=archive, resolution=16)
    assert from_zip.images.shape == (4, 3, 16, 16)
    assert from_zip.labels.tolist() == labels


@pytest.mark.parametrize("name", ["cifar10", "imagefolder"])
def test_missing_dataset_path_raises_documented_error(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, path=missing)
    message = str(info.value)
    assert name in message and "nowhere" in message and "To get it" in message


def test_cli_models_list_and_data_info_json():
    from click.testing import CliRunner

    from cmscale.cli import main

    runner = CliRunner()
    listed = runner.invoke(main, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert {"name", "params", "flops_per_image_forward"} <= set(rows[0])
    # every preset of the one table, in table order (each ladder's growth is checked in test_models)
    from cmscale.models.presets import PRESETS

    assert [row["name"] for row in rows] == list(PRESETS)
    params = [row["params"] for row in rows]
    # distinct networks have distinct counts (edm2-img64-* and edm2-img512-* are one network on different data)
    networks = {(row["architecture"], row["model_channels"], tuple(row["channel_mult"]), row["num_blocks"])
                for row in rows}
    assert all(p > 0 for p in params) and len(set(params)) == len(networks)
    info = runner.invoke(main, ["data", "info", "digits", "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["num_images"] == 1797
    missing = runner.invoke(main, ["data", "info", "cifar10", "--path", "/definitely/missing"])
    assert missing.exit_code != 0 and "/definitely/missing" in missing.output


def test_digits_read_from_the_bundled_file_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits as sklearn_digits

    reference = sklearn_digits()
    data = load_digits(8)
    expected = torch.from_numpy(reference.images.astype(np.float32) * (255.0 / 16.0)).round().to(torch.uint8)
    assert torch.equal(data.images[:, 0], expected)
    assert torch.equal(data.labels, torch.from_numpy(reference.target.astype(np.int64)))
