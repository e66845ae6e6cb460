"""Datasets: embedded digits, CIFAR-10 and EDM-style image folders/zips (pixels or VAE latents)."""

from cmscale.data.archive import ArchiveDataset, DataFormatError
from cmscale.data.datasets import (
    DATASET_CHANNELS,
    DATASETS,
    DatasetNotFoundError,
    ImageData,
    dataset_channels,
    describe_storage,
    load_cifar10,
    load_dataset,
    load_digits,
    load_imagefolder,
)

__all__ = [
    "ArchiveDataset",
    "DataFormatError",
    "describe_storage",
    "DATASET_CHANNELS",
    "DATASETS",
    "DatasetNotFoundError",
    "ImageData",
    "dataset_channels",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_imagefolder",
]
