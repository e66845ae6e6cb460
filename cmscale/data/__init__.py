"""Datasets: embedded digits, CIFAR-10 and EDM-style image folders/zips."""

from cmscale.data.datasets import (
    DATASET_CHANNELS,
    DATASETS,
    DatasetNotFoundError,
    ImageData,
    dataset_channels,
    load_cifar10,
    load_dataset,
    load_digits,
    load_imagefolder,
)

__all__ = [
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
