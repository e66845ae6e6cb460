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
