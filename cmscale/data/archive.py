"""EDM-format data sets read item by item: a folder or zip of images (or of EDM2's VAE latents).

The layout is the one NVlabs/edm's and NVlabs/edm2's ``dataset_tool.py`` write: image files
(``00000/img00000000.png``) or latent files (``00000/img-mean-std-00000000.npy``: the VAE
posterior's mean and standard deviation stacked on the channel axis, float32 ``2C x h x w``),
and a ``dataset.json`` of ``{"labels": [[relative_path, class], ...]}`` (or ``"labels": null``).
Items are taken in sorted file-name order, as EDM's ``ImageFolderDataset`` takes them.

Nothing is decoded up front. Opening reads the zip's central directory once and keeps only four
numpy columns of it (name, local-header offset, compressed size, method: about 60 bytes an item,
so ImageNet's 1.28M entries take 80 MB); an item is then two ``pread`` calls and a decode, in
whichever process asks (the DataLoader's workers). The file handle is opened per process, so the
dataset pickles to, or forks into, workers without sharing a file position.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LATENT_SUFFIX = ".npy"
LABELS_FILE = "dataset.json"
PIXELS, LATENTS = "pixels", "latents"
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # the 30 bytes before a zip member's name
_LOCAL_HEADER_SIGNATURE = 0x04034B50
SHAPE_PROBES = 16  # items whose shape is checked when the set is opened (every item is checked when read)


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


class DataFormatError(ValueError):
    """A data set on disk is not in the format cmscale reads; the message names the file and the fix."""


def _member_suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


class ArchiveDataset(torch.utils.data.Dataset):
    """A folder or zip in EDM's layout; ``dataset[i]`` is item ``i`` as a numpy array.

    Pixels come as uint8 ``C x H x W``; latents as float32 ``2C x h x w`` (mean, then std).
    ``labels`` is an int64 array (one class per item) or None, and ``label_dim`` the number of
    classes (0 when the set has no labels).
    """

    def __init__(self, path: Path | str, name: str = "imagefolder"):
        self.path = Path(path)
        self.name = name
        self.target_resolution: int | None = None  # pixels: the run's resolution, when it differs
        self._fd: int | None = None
        self._fd_pid: int | None = None
        if self.path.is_file() and zipfile.is_zipfile(self.path):
            self.is_zip = True
            names, self._offsets, self._sizes, self._methods, labels_json = _zip_index(self.path)
        elif self.path.is_dir():
            self.is_zip = False
            names, labels_json = _folder_index(self.path)
        elif not self.path.exists():
            raise DatasetNotFoundError(name, self.path)
        else:
            raise DataFormatError(f"{self.path}: neither a folder nor a zip file; pass a folder or .zip of PNG "
                                  "images (or of EDM2 latents) in the layout of EDM's dataset_tool.py")
        suffixes = {_member_suffix(n) for n in names}
        if not names:
            raise DatasetNotFoundError(name, self.path, "no .png images or .npy latents inside")
        if LATENT_SUFFIX in suffixes and len(suffixes) > 1:
            raise DataFormatError(f"{self.path}: holds both images and .npy latents; a data set is one or the other "
                                  "(write latents to their own zip with `cmscale data encode`)")
        self.kind = LATENTS if LATENT_SUFFIX in suffixes else PIXELS
        # Fixed-width bytes: one buffer instead of a million Python strings (each ~80 bytes).
        self._names = np.array([n.encode() for n in names])
        self.labels = _read_labels(self.path, labels_json, names)
        self.label_dim = int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0
        first = self.read(0)
        self.item_shape = tuple(first.shape)
        self.item_dtype = first.dtype
        for index in np.unique(np.linspace(0, len(names) - 1, SHAPE_PROBES).astype(np.int64))[1:]:
            self.read(int(index))  # raises naming the file when its shape differs

    # -- what the set holds ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._names)

    @property
    def channels(self) -> int:
        """Channels the network sees: the image's, or half the latent file's (mean and std)."""
        return self.item_shape[0] // 2 if self.kind == LATENTS else self.item_shape[0]

    @property
    def resolution(self) -> int:
        return self.item_shape[-1]

    def member_name(self, index: int) -> str:
        return self._names[index].decode()

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.item_shape)
        labels = f"{self.label_dim} classes" if self.label_dim else "no labels"
        return f"{self.path} ({'zip' if self.is_zip else 'folder'}, {len(self)} {self.kind} of {shape}, {labels})"

    def info(self) -> dict:
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "num_images": len(self),
                "resolution": self.resolution, "channels": self.channels, "item_shape": list(self.item_shape),
                "num_classes": self.label_dim, "storage": "streamed"}

    # -- reading --------------------------------------------------------------------------------
    def _file(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():  # a forked worker opens its own handle
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def read_bytes(self, index: int) -> bytes:
        if not self.is_zip:
            return (self.path / self.member_name(index)).read_bytes()
        fd, offset, size = self._file(), int(self._offsets[index]), int(self._sizes[index])
        # One read for header, name and data; the local extra field is usually what the central one says.
        chunk = os.pread(fd, _LOCAL_HEADER.size + len(self._names[index]) + size + 64, offset)
        fields = _LOCAL_HEADER.unpack_from(chunk)
        if fields[0] != _LOCAL_HEADER_SIGNATURE:
            raise DataFormatError(f"{self.path}: member {self.member_name(index)!r} has no local header at its "
                                  "offset; the zip is damaged (write it again)")
        start = _LOCAL_HEADER.size + fields[9] + fields[10]
        payload = chunk[start : start + size]
        if len(payload) < size:
            payload = os.pread(fd, size, offset + start)
        if self._methods[index] == zipfile.ZIP_DEFLATED:
            payload = zlib.decompress(payload, -15)
        elif self._methods[index] != zipfile.ZIP_STORED:
            raise DataFormatError(f"{self.path}: member {self.member_name(index)!r} uses zip compression "
                                  f"{self._methods[index]}; write the zip stored or deflated")
        return payload

    def read(self, index: int) -> np.ndarray:
        payload = self.read_bytes(index)
        array = _decode_latent(payload) if self.kind == LATENTS else _decode_image(payload)
        expected = getattr(self, "item_shape", None)
        if expected is not None and tuple(array.shape) != expected:
            raise DataFormatError(
                f"{self.path}: {self.member_name(index)} is {'x'.join(map(str, array.shape))} but "
                f"{self.member_name(0)} is {'x'.join(map(str, expected))}; every item of a data set must have one "
                "shape (resize the images to one resolution first, e.g. with EDM's dataset_tool.py --resolution)")
        return array

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read(int(index))

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _fd=None, _fd_pid=None)

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass


def _decode_image(payload: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as image:
        array = np.array(image)  # writable, so torch.from_numpy takes it without a warning
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _decode_latent(payload: bytes) -> np.ndarray:
    array = np.load(io.BytesIO(payload), allow_pickle=False)
    return np.ascontiguousarray(array, dtype=np.float32)


def _zip_index(path: Path):
    """Sorted data members of the zip as compact columns, and the bytes of its dataset.json."""
    with zipfile.ZipFile(path) as archive:
        infos = [info for info in archive.infolist()
                 if _member_suffix(info.filename) in (*IMAGE_SUFFIXES, LATENT_SUFFIX) and not info.is_dir()]
        labels_json = archive.read(LABELS_FILE) if LABELS_FILE in archive.NameToInfo else None
    infos.sort(key=lambda info: info.filename)
    names = [info.filename for info in infos]
    offsets = np.fromiter((info.header_offset for info in infos), np.int64, len(infos))
    sizes = np.fromiter((info.compress_size for info in infos), np.int64, len(infos))
    methods = np.fromiter((info.compress_type for info in infos), np.uint8, len(infos))
    return names, offsets, sizes, methods, labels_json


def _folder_index(path: Path):
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if _member_suffix(p.name) in (*IMAGE_SUFFIXES, LATENT_SUFFIX) and p.is_file())
    label_path = path / LABELS_FILE
    return names, label_path.read_bytes() if label_path.is_file() else None


def _read_labels(source: Path, labels_json: bytes | None, names: list[str]) -> np.ndarray | None:
    """Labels in item order from dataset.json; None when it is absent or says ``"labels": null``."""
    where = f"{source}/{LABELS_FILE}" if source.is_dir() else f"{LABELS_FILE} inside {source}"
    if labels_json is None:
        return None
    fix = ('it must be {"labels": [["00000/img00000000.png", 3], ...]} (or "labels": null), as EDM\'s '
           "dataset_tool.py writes it")
    try:
        entries = json.loads(labels_json)["labels"]
    except (ValueError, KeyError, TypeError) as error:
        raise DataFormatError(f"{where} is malformed ({type(error).__name__}: {error}); {fix}") from None
    if entries is None:
        return None
    try:
        mapping = {str(name).replace("\\", "/"): int(label) for name, label in entries}
    except (ValueError, TypeError) as error:
        raise DataFormatError(f"{where}: field 'labels' is not a list of [relative_path, int] pairs ({error}); "
                              f"{fix}") from None
    labels = np.empty(len(names), dtype=np.int64)
    for position, name in enumerate(names):
        label = mapping.get(name)
        if label is None:
            raise DataFormatError(f"{where} has no label for {name}; list every image (or none: "
                                  '"labels": null)')
        labels[position] = label
    if len(labels) and labels.min() < 0:
        raise DataFormatError(f"{where}: labels must be class indices >= 0; found {int(labels.min())}")
    return labels
