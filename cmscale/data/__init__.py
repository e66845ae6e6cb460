"""Datasets: embedded digits, CIFAR-10 and EDM-style image folders/zips."""

from cmscale.data.datasets import (
    DATASETS,
    DatasetNotFoundError,
    ImageData,
    load_cifar10,
    load_dataset,
    load_digits,
    load_imagefolder,
)

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "ImageData",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_imagefolder",
]
