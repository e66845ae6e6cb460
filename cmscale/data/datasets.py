"""Image datasets: the embedded ``digits`` default, CIFAR-10 from disk, and EDM-style zips/folders.

Every reader returns an :class:`ImageData` holding uint8 images (NCHW) and int64 labels;
``ImageData.batch`` converts to float in [-1, 1], the range every model in cmscale trains on.
Nothing here downloads: real data sets are read from a path the user gives.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

# Image channels per dataset: the one place that knows digits are grayscale (counting FLOPs and
# sizing networks needs it before any data is read).
DATASET_CHANNELS = {"digits": 1, "cifar10": 3, "imagefolder": 3}
DATASETS = tuple(DATASET_CHANNELS)
DIGITS_DEFAULT_RESOLUTION = 16


def dataset_channels(name: str) -> int:
    """Image channels of dataset ``name`` (3 for names this table does not know)."""
    return DATASET_CHANNELS.get(name, 3)

HOW_TO_GET = {
    "cifar10": (
        "download the CIFAR-10 python version (cifar-10-python.tar.gz) on a machine with internet, "
        "extract it and pass the folder that holds data_batch_1..5 and test_batch"
    ),
    "imagefolder": (
        "pass a folder or .zip of PNG images, optionally with a dataset.json of labels "
        "(the layout written by NVlabs/edm's dataset_tool.py)"
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are not where the user said; names the dataset, path and fix."""

    def __init__(self, dataset: str, path: Path | str | None, detail: str = ""):
        self.dataset = dataset
        self.path = path
        hint = HOW_TO_GET.get(dataset, "check the path")
        where = f"at {path}" if path is not None else "(no path given: set `data_path`)"
        message = f"dataset {dataset!r} not found {where}"
        if detail:
            message += f": {detail}"
        super().__init__(f"{message}. To get it: {hint}.")


@dataclass
class ImageData:
    """Images as uint8 NCHW plus integer labels, with a float view in [-1, 1]."""

    name: str
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices].float() / 127.5 - 1.0

    def as_float(self) -> torch.Tensor:
        return self.images.float() / 127.5 - 1.0

    def info(self) -> dict:
        return {
            "name": self.name,
            "num_images": len(self),
            "resolution": self.resolution,
            "channels": self.channels,
            "num_classes": int(self.labels.max().item()) + 1 if len(self) else 0,
            "range": [-1.0, 1.0],
        }


def _resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    resized = F.interpolate(
        images.float(), size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


def _digits_pixels_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits as (N, 8, 8) values 0..16 and (N,) labels, from the CSV inside scikit-learn.

    Importing ``sklearn.datasets`` costs seconds of start-up in every training job, so the bundled
    file is read directly (the same file and parsing ``sklearn.datasets.load_digits`` uses); only
    if scikit-learn moved it does this fall back to the public function.
    """
    spec = importlib.util.find_spec("sklearn")
    csv_path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv_path is not None and csv_path.is_file():
        table = np.loadtxt(csv_path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits(resolution: int = DIGITS_DEFAULT_RESOLUTION) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), resized to ``resolution``."""
    values, labels = _digits_pixels_and_labels()
    # Pixel values are 0..16 in the original data.
    pixels = torch.from_numpy(values.astype(np.float32) * (255.0 / 16.0)).round().to(torch.uint8)
    images = _resize_uint8(pixels[:, None], resolution)
    return ImageData("digits", images, torch.from_numpy(labels))


def load_cifar10(path: Path | str, split: str = "train", resolution: int | None = None) -> ImageData:
    """CIFAR-10 from the official python-pickle layout (``data_batch_1..5``, ``test_batch``)."""
    root = Path(path)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise DatasetNotFoundError("cifar10", root, f"missing {', '.join(missing)}")
    arrays, labels = [], []
    for name in names:
        with open(root / name, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        arrays.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"])
    images = torch.from_numpy(np.concatenate(arrays))
    if resolution is not None:
        images = _resize_uint8(images, resolution)
    return ImageData("cifar10", images, torch.tensor(labels, dtype=torch.int64))


def _decode_png(payload: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as image:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return array.transpose(2, 0, 1)


def load_imagefolder(path: Path | str, resolution: int | None = None) -> ImageData:
    """A folder or zip of PNGs, with optional ``dataset.json`` ``{"labels": [[relpath, label], ...]}``."""
    source = Path(path)
    if not source.exists():
        raise DatasetNotFoundError("imagefolder", source)
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = sorted(n for n in archive.namelist() if n.lower().endswith(".png"))
            files = {name: archive.read(name) for name in names}
            labels_json = archive.read("dataset.json") if "dataset.json" in archive.namelist() else None
    elif source.is_dir():
        paths = sorted(p for p in source.rglob("*.png"))
        files = {p.relative_to(source).as_posix(): p.read_bytes() for p in paths}
        label_path = source / "dataset.json"
        labels_json = label_path.read_bytes() if label_path.is_file() else None
    else:
        raise DatasetNotFoundError("imagefolder", source, "not a folder or a zip file")
    if not files:
        raise DatasetNotFoundError("imagefolder", source, "no .png files inside")
    label_map: dict[str, int] = {}
    if labels_json is not None:
        try:
            entries = json.loads(labels_json).get("labels") or []
            label_map = {str(name): int(label) for name, label in entries}
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{source}/dataset.json: field 'labels' must be a list of [relative_path, int_label] pairs ({error})"
            ) from error
    arrays = [_decode_png(payload) for payload in files.values()]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"{source}: images have different shapes {sorted(shapes)}; resize them to one resolution first"
        )
    images = torch.from_numpy(np.stack(arrays))
    if resolution is not None:
        images = _resize_uint8(images, resolution)
    labels = torch.tensor([label_map.get(name, 0) for name in files], dtype=torch.int64)
    return ImageData("imagefolder", images, labels)


def load_dataset(
    name: str, path: Path | str | None = None, resolution: int | None = None, split: str = "train"
) -> ImageData:
    """Load a dataset by name. ``digits`` needs no path; the others read from ``path``."""
    if name == "digits":
        return load_digits(resolution or DIGITS_DEFAULT_RESOLUTION)
    if name == "cifar10":
        if path is None:
            raise DatasetNotFoundError("cifar10", None)
        return load_cifar10(path, split=split, resolution=resolution)
    if name == "imagefolder":
        if path is None:
            raise DatasetNotFoundError("imagefolder", None)
        return load_imagefolder(path, resolution=resolution)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
