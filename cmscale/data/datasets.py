"""Image datasets: the embedded ``digits`` default, CIFAR-10 from disk, and EDM-style zips/folders.

Every reader returns an :class:`ImageData` holding uint8 images (NCHW) and int64 labels;
``ImageData.batch`` converts to float in [-1, 1], the range every model in cmscale trains on.
Nothing here downloads: real data sets are read from a path the user gives.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cmscale.data.archive import LATENTS, PIXELS, ArchiveDataset, DataFormatError, DatasetNotFoundError
from cmscale.data.latents import LatentScaling

# Image channels per dataset: the one place that knows digits are grayscale (counting FLOPs and
# sizing networks needs it before any data is read).
DATASET_CHANNELS = {"digits": 1, "cifar10": 3, "imagefolder": 3}
DATASETS = tuple(DATASET_CHANNELS)
DIGITS_DEFAULT_RESOLUTION = 16
DEFAULT_IN_MEMORY_BYTES = 2 * 2**30


def dataset_channels(name: str, vae_path: str | None = None) -> int:
    """Channels the network sees: dataset ``name``'s image channels (3 for names this table does not
    know), or the VAE's latent channels in a latent run (``vae_path`` set)."""
    if vae_path is not None:
        return LatentScaling().channels
    return DATASET_CHANNELS.get(name, 3)

@dataclass
class ImageData:
    """Images as uint8 NCHW plus integer labels, with a float view in [-1, 1]."""

    name: str
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)
    label_dim: int = 0  # classes the labels index (0: unlabelled, the labels are all zero)
    kind: str = "pixels"

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
            "num_classes": self.label_dim,
            "range": [-1.0, 1.0],
            "storage": "in memory",
        }

    def describe(self) -> str:
        labels = f"{self.label_dim} classes" if self.label_dim else "no labels"
        return f"{self.name} ({len(self)} images of {self.channels}x{self.resolution}x{self.resolution}, {labels})"


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
    return ImageData("digits", images, torch.from_numpy(labels), label_dim=10)


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
        entry = _read_cifar_batch(root / name)
        arrays.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"])
    images = torch.from_numpy(np.concatenate(arrays))
    if resolution is not None:
        images = _resize_uint8(images, resolution)
    return ImageData("cifar10", images, torch.tensor(labels, dtype=torch.int64), label_dim=10)


def _read_cifar_batch(path: Path) -> dict:
    """One CIFAR-10 python batch: a dict of a uint8 array ('data') and a list of ints ('labels').
    Read by an unpickler that admits numpy arrays and plain containers only: a crafted batch file
    cannot run code (a plain pickle.load would call whatever the file names)."""
    from cmscale.safe_pickle import BoundedUnpickler, numpy_array_globals

    try:
        with open(path, "rb") as handle:
            entry = BoundedUnpickler(handle, str(path), numpy_array_globals(), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DataFormatError(f"{path}: not a CIFAR-10 python batch ({error}); download cifar-10-python.tar.gz "
                              "from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it") from None
    if not (isinstance(entry, dict) and isinstance(entry.get("data"), np.ndarray)
            and isinstance(entry.get("labels"), list)):
        raise DataFormatError(f"{path}: not a CIFAR-10 python batch (expected a dict with a 'data' array and a "
                              "'labels' list); download cifar-10-python.tar.gz and unpack it")
    return entry


def load_imagefolder(path: Path | str, resolution: int | None = None) -> ImageData:
    """A folder or zip of PNGs in EDM's layout (labels from ``dataset.json``), decoded into memory."""
    return decode_in_memory(ArchiveDataset(path), resolution)


def decode_in_memory(archive: ArchiveDataset, resolution: int | None = None) -> ImageData:
    """Every image of ``archive`` as one uint8 tensor (small sets: a step is then a gather)."""
    if archive.kind != PIXELS:
        raise DataFormatError(f"{archive.path} holds VAE latents; they are streamed, not decoded into memory")
    images = torch.empty((len(archive), *archive.item_shape), dtype=torch.uint8)
    for index in range(len(archive)):
        images[index] = torch.from_numpy(archive[index])
    if resolution is not None:
        images = _resize_uint8(images, resolution)
    if archive.labels is not None:
        labels = torch.from_numpy(archive.labels)
    else:
        labels = torch.zeros(len(archive), dtype=torch.int64)
    return ImageData(archive.name, images, labels, label_dim=archive.label_dim)


def in_memory_limit() -> int:
    """Bytes of uint8 images below which an image folder is decoded into memory (default 2 GiB;
    ``CMSCALE_DATA_IN_MEMORY_BYTES`` overrides, 0 streams every folder)."""
    return int(os.environ.get("CMSCALE_DATA_IN_MEMORY_BYTES", DEFAULT_IN_MEMORY_BYTES))


def load_dataset(
    name: str, path: Path | str | None = None, resolution: int | None = None, split: str = "train",
    vae_path: Path | str | None = None,
) -> ImageData | ArchiveDataset:
    """Load a dataset by name. ``digits`` needs no path; the others read from ``path``.

    Digits and CIFAR-10 are held in memory. An image folder or zip is decoded into memory when
    its images at ``resolution`` take at most :func:`in_memory_limit` bytes, else (and always for
    VAE latents) it is returned as an :class:`ArchiveDataset` that DataLoader workers read item
    by item; ``describe_storage`` says which and why. ``vae_path`` (a latent-space run) must be
    given exactly when the set holds latents: a mismatch is refused before anything trains.
    """
    if vae_path is not None and name != "imagefolder":
        raise DataFormatError(f"vae_path is set but dataset {name!r} is trained in pixel space; latent runs read "
                              "an image folder or zip of latents (dataset = 'imagefolder', written by "
                              "`cmscale data encode`)")
    if name == "digits":
        return load_digits(resolution or DIGITS_DEFAULT_RESOLUTION)
    if name == "cifar10":
        if path is None:
            raise DatasetNotFoundError("cifar10", None)
        return load_cifar10(path, split=split, resolution=resolution)
    if name == "imagefolder":
        if path is None:
            raise DatasetNotFoundError("imagefolder", None)
        archive = ArchiveDataset(path)
        check_latent_match(archive, vae_path)
        if vae_path is not None:
            from cmscale.data.vae import check_vae_folder

            check_vae_folder(vae_path)
        if archive.kind == PIXELS and in_memory_bytes(archive, resolution) <= in_memory_limit():
            return decode_in_memory(archive, resolution)
        if resolution is not None and archive.resolution != resolution and archive.kind == LATENTS:
            raise DataFormatError(
                f"{archive.path}: its latents are {archive.channels}x{archive.resolution}x{archive.resolution} "
                f"but resolution = {resolution}; a latent run's resolution is the latents' ({archive.resolution})")
        archive.target_resolution = resolution
        return archive
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def check_latent_match(archive: ArchiveDataset, vae_path: Path | str | None) -> None:
    """Latents need the VAE that made them (and a latent run needs latents), named before training."""
    if archive.kind == LATENTS and vae_path is None:
        raise DataFormatError(
            f"{archive.path} holds VAE latents ({archive.member_name(0)}: posterior mean and std), which a "
            "pixel-space run cannot train on: set vae_path to the VAE folder that encoded them (the run then "
            "trains in latent space and decodes its samples for FID), or set data_path to the images")
    if archive.kind == LATENTS and archive.channels != LatentScaling().channels:
        raise DataFormatError(
            f"{archive.path}: {archive.member_name(0)} holds {archive.item_shape[0]} channels; EDM2's latents "
            f"hold the mean and std of {LatentScaling().channels} (8 in all): encode with `cmscale data encode`")
    if archive.kind == PIXELS and vae_path is not None:
        raise DataFormatError(
            f"vae_path is set but {archive.path} holds images; encode them once with `cmscale data encode "
            f"{archive.path} --vae {vae_path} --out LATENTS.zip` and set data_path to LATENTS.zip")


def in_memory_bytes(archive: ArchiveDataset, resolution: int | None = None) -> int:
    side = resolution or archive.resolution
    return len(archive) * archive.item_shape[0] * side * side


def describe_storage(data: ImageData | ArchiveDataset, workers: int | None = None) -> str:
    """One line for the run's log: what the data is and whether it is held in memory or streamed."""
    if isinstance(data, ImageData):
        nbytes = data.images.numel() * data.images.element_size()
        return f"data: {data.describe()}, held in memory ({nbytes / 2**20:.1f} MiB of uint8)"
    why = ("VAE latents are always streamed" if data.kind == LATENTS else
           f"{in_memory_bytes(data, getattr(data, 'target_resolution', None)) / 2**30:.2f} GiB of images is above "
           f"the {in_memory_limit() / 2**30:.2f} GiB in-memory limit (CMSCALE_DATA_IN_MEMORY_BYTES)")
    readers = f" by {workers} DataLoader workers" if workers is not None else ""
    return f"data: {data.describe()}, streamed{readers} ({why})"
