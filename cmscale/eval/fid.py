"""FID through torch-fidelity, against reference statistics cached per (dataset, resolution, extractor).

Reference statistics (mu, Sigma of the training set's features) are computed once with
torch-fidelity's feature and statistics functions and stored by torch-fidelity's own cache
(``cache_lookup_one_recompute_on_miss``, atomic rename) under ``$CMSCALE_CACHE_DIR/fid-stats``,
with the file name torch-fidelity itself uses for a named input::

    <input>-<extractor>-stat-fid-<layer>.pt     input = <dataset>-r<resolution>-<data sha256[:8]>

A lock around the computation makes concurrent jobs compute it once. FID of generated images is
then ``torch_fidelity.calculate_metrics(input1=samples, input2=reference data,
input2_cache_name=<input>, fid=True, ...)``, which finds the cached statistics and does not touch
the reference images again. No Frechet distance is written by hand here.

KID (Binkowski et al. 2018; unbiased, so a few hundred samples do not shift it the way they shift
FID) comes from the same call with ``kid=True``: torch-fidelity caches the reference *features*
(``<input>-<extractor>-features-<layer>.pt``) beside the statistics, under the same lock.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_featuresdict_to_metric
from torch_fidelity.utils import (
    cache_lookup_one_recompute_on_miss,
    create_feature_extractor,
    get_featuresdict_from_dataset,
)

from cmscale.data.archive import PIXELS, ArchiveDataset, DataFormatError
from cmscale.data.datasets import ImageData, _resize_uint8
from cmscale.eval.cache import cache_root, locked
from cmscale.eval.features import FeatureSpace

FEATURE_BATCH = 250
KID_SUBSET_SIZE = 1000  # torch-fidelity's default; capped by the sample and reference counts


class UInt8Images(Dataset):
    """A uint8 NCHW tensor as the Dataset torch-fidelity reads; grey images become RGB when the
    extractor takes three channels (Inception)."""

    def __init__(self, images: torch.Tensor, channels: int):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images NCHW, got {tuple(images.shape)} {images.dtype}")
        self.images = images.cpu()
        self.channels = channels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if self.channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 in [0, 255], as a PNG of the sample would store them.
    Non-finite pixels (a diverged model) become mid-grey, so FID is large but finite."""
    images = torch.nan_to_num(images.detach().float(), nan=0.0, posinf=1.0, neginf=-1.0)
    return ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def data_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:8]


class ArchiveImages(Dataset):
    """A streamed image folder or zip as torch-fidelity's Dataset (items read when asked for),
    resized to the run's resolution like the in-memory path."""

    def __init__(self, archive: ArchiveDataset, channels: int):
        if archive.kind != PIXELS:
            raise DataFormatError(f"{archive.path} holds VAE latents, not images; FID needs pixel reference "
                                  "statistics: set eval.reference to the image set (or a published fid-refs file)")
        self.archive, self.channels = archive, channels

    def __len__(self) -> int:
        return len(self.archive)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = torch.from_numpy(self.archive[index])
        side = self.archive.target_resolution
        if side is not None and image.shape[-1] != side:
            image = _resize_uint8(image[None], side)[0]
        if self.channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image


def reference_images(data: ImageData | ArchiveDataset, channels: int) -> Dataset:
    if isinstance(data, ArchiveDataset):
        return ArchiveImages(data, channels)
    return UInt8Images(data.images, channels)


def data_id(data: ImageData | ArchiveDataset) -> str:
    """``<name>-r<resolution>-<digest>``: the digest hashes the pixels of a set held in memory, and
    the member names and sizes of a streamed one (hashing a million images would take an hour)."""
    if isinstance(data, ArchiveDataset):
        digest = hashlib.sha256(data._names.tobytes())
        digest.update(np.asarray(data._sizes if data.is_zip else [len(data)]).tobytes())
        resolution = data.target_resolution or data.resolution
        return f"{data.name}-r{resolution}-{digest.hexdigest()[:8]}"
    return f"{data.name}-r{data.resolution}-{data_digest(data.images)}"


@dataclass(frozen=True)
class Reference:
    """The training set in one feature space. ``id`` goes into every eval row."""

    input_name: str  # <dataset>-r<resolution>-<data hash>
    space: FeatureSpace
    data: ImageData | ArchiveDataset
    stats_root: Path

    @property
    def id(self) -> str:
        return f"{self.input_name}-{self.space.registered_name}"

    @property
    def stats_name(self) -> str:
        # torch-fidelity's name for the FID statistics of a named input (metric_fid.py).
        return f"{self.id}-stat-fid-{self.space.layer}"

    @property
    def stats_path(self) -> Path:
        return self.stats_root / f"{self.stats_name}.pt"

    @property
    def features_path(self) -> Path:
        # torch-fidelity's name for the cached features of a named input (utils.py), read by KID.
        return self.stats_root / f"{self.id}-features-{self.space.layer}.pt"


def _fidelity_common(space: FeatureSpace, device: torch.device | str, batch_size: int) -> dict:
    return {
        **space.fidelity_kwargs(),
        "cuda": torch.device(device).type == "cuda",
        "batch_size": batch_size,
        "save_cpu_ram": True,  # no DataLoader worker processes: the data is already in memory
        "verbose": False,
    }


def reference_statistics(data: ImageData | ArchiveDataset, space: FeatureSpace, device: torch.device | str = "cpu",
                         batch_size: int = FEATURE_BATCH) -> tuple[Reference, dict[str, np.ndarray]]:
    """The training set's FID statistics ``{"mu", "sigma"}``, computed once and cached on disk."""
    reference = Reference(data_id(data), space, data, cache_root() / "fid-stats")
    kwargs = _fidelity_common(space, device, batch_size)

    def compute() -> dict[str, np.ndarray]:
        extractor = create_feature_extractor(space.registered_name, [space.layer], **kwargs)
        features = get_featuresdict_from_dataset(reference_images(data, space.channels), extractor, batch_size,
                                                 kwargs["cuda"], save_cpu_ram=True, verbose=False)
        return fid_featuresdict_to_statistics(features, space.layer)

    cache = {"cache": True, "cache_root": str(reference.stats_root), "verbose": False}
    if not reference.stats_path.is_file():
        with locked(reference.stats_path):  # one job computes, the others wait and then read
            stats = cache_lookup_one_recompute_on_miss(reference.stats_name, compute, **cache)
    else:
        stats = cache_lookup_one_recompute_on_miss(reference.stats_name, compute, **cache)
    return reference, stats


@dataclass(frozen=True)
class Scores:
    """FID, and KID (mean and std over ``kid_subsets`` random subsets) when asked for."""

    fid: float
    kid: float | None = None
    kid_std: float | None = None


def scores_to_reference(
    images: torch.Tensor, reference: Reference, device: torch.device | str = "cpu",
    batch_size: int = FEATURE_BATCH, kid_subsets: int = 0,
) -> Scores:
    """FID (and KID when ``kid_subsets`` > 0) between uint8 ``images`` and the reference, by one
    ``torch_fidelity.calculate_metrics`` call. The reference statistics (and, for KID, features)
    come from the cache, so the reference images go through the extractor at most once."""
    if not reference.stats_path.is_file():
        reference_statistics(reference.data, reference.space, device, batch_size)
    kid = {}
    if kid_subsets > 0:
        subset = min(KID_SUBSET_SIZE, images.shape[0], len(reference.data))
        kid = {"kid": True, "kid_subsets": kid_subsets, "kid_subset_size": subset}

    def calculate() -> dict[str, float]:
        return torch_fidelity.calculate_metrics(
            input1=UInt8Images(images, reference.space.channels),
            input2=reference_images(reference.data, reference.space.channels),
            input2_cache_name=reference.input_name,
            cache=True,
            cache_root=str(reference.stats_root),
            fid=True,
            **kid,
            **_fidelity_common(reference.space, device, batch_size),
        )

    if kid and not reference.features_path.is_file():
        with locked(reference.features_path):  # one job extracts the reference features, the others read them
            metrics = calculate()
    else:
        metrics = calculate()
    if not kid:
        return Scores(float(metrics[KEY_METRIC_FID]))
    kid_mean, kid_std = float(metrics[KEY_METRIC_KID_MEAN]), float(metrics[KEY_METRIC_KID_STD])
    return Scores(float(metrics[KEY_METRIC_FID]), kid_mean, kid_std)


def features_of(images: torch.Tensor, space: FeatureSpace, device: torch.device | str = "cpu",
                batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """Features (``N x D``) of uint8 ``images`` in ``space``, by torch-fidelity's extractor."""
    kwargs = _fidelity_common(space, device, batch_size)
    extractor = create_feature_extractor(space.registered_name, [space.layer], **kwargs)
    features = get_featuresdict_from_dataset(UInt8Images(images, space.channels), extractor, batch_size,
                                             kwargs["cuda"], save_cpu_ram=True, verbose=False)
    return features[space.layer]


def fid_to_stats(features: torch.Tensor, reference: dict[str, np.ndarray]) -> float:
    """FID between features and reference ``{"mu", "sigma"}``, by torch-fidelity's statistics and metric."""
    stats = fid_featuresdict_to_statistics({"features": features}, "features")
    as_float64 = lambda stats: {key: np.asarray(stats[key], np.float64) for key in ("mu", "sigma")}  # noqa: E731
    return float(fid_statistics_to_metric(as_float64(stats), as_float64(reference), verbose=False)[KEY_METRIC_FID])


def reference_features(reference: Reference, device: torch.device | str = "cpu",
                       batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """The reference images' features, cached in the file torch-fidelity's KID itself caches them in."""
    kwargs = _fidelity_common(reference.space, device, batch_size)

    def compute() -> torch.Tensor:
        extractor = create_feature_extractor(reference.space.registered_name, [reference.space.layer], **kwargs)
        features = get_featuresdict_from_dataset(reference_images(reference.data, reference.space.channels),
                                                 extractor, batch_size, kwargs["cuda"], save_cpu_ram=True,
                                                 verbose=False)
        return features[reference.space.layer]

    cache = {"cache": True, "cache_root": str(reference.stats_root), "verbose": False}
    with locked(reference.features_path):
        return cache_lookup_one_recompute_on_miss(reference.features_path.stem, compute, **cache)


def kid_between(features: torch.Tensor, reference: torch.Tensor, subsets: int) -> tuple[float, float]:
    """KID (mean, std over ``subsets``) between two feature sets, by torch-fidelity's KID."""
    subset = min(KID_SUBSET_SIZE, features.shape[0], reference.shape[0])
    metric = kid_featuresdict_to_metric({"f": features}, {"f": reference}, "f", kid_subsets=subsets,
                                        kid_subset_size=subset, verbose=False)
    return float(metric[KEY_METRIC_KID_MEAN]), float(metric[KEY_METRIC_KID_STD])


def fid_to_reference(images: torch.Tensor, reference: Reference, device: torch.device | str = "cpu",
                     batch_size: int = FEATURE_BATCH) -> float:
    """FID between uint8 ``images`` and the reference, by ``torch_fidelity.calculate_metrics``.
    The reference statistics come from the cache (computed first if missing), so the reference
    images are not read again."""
    return scores_to_reference(images, reference, device, batch_size).fid


def fid_between(images_a: torch.Tensor, images_b: torch.Tensor, space: FeatureSpace, device: torch.device | str = "cpu",
                batch_size: int = FEATURE_BATCH) -> float:
    """FID between two uint8 image sets in ``space`` (nothing cached)."""
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(images_a, space.channels),
        input2=UInt8Images(images_b, space.channels),
        cache=False,
        fid=True,
        **_fidelity_common(space, device, batch_size),
    )
    return float(metrics[KEY_METRIC_FID])


@dataclass(frozen=True)
class NoiseFloor:
    """FID and KID of real images against other real images, at an eval's sample count.

    A perfect generator scores about ``fid_mean`` (FID's finite-sample bias), and two evals of one
    model differ by about ``fid_std``: differences between models smaller than that are noise.
    """

    num_samples: int
    reference_size: int
    repeats: int
    fid_mean: float
    fid_std: float
    kid_mean: float
    kid_std: float

    def to_json(self) -> dict:
        return asdict(self)


def noise_floor(data: ImageData, space: FeatureSpace, num_samples: int, repeats: int = 3, kid_subsets: int = 20,
                device: torch.device | str = "cpu", batch_size: int = FEATURE_BATCH, seed: int = 0) -> NoiseFloor:
    """Split the data ``repeats`` times at random into ``num_samples`` images and the disjoint rest,
    and score the first part against the rest with the evals' FID and KID."""
    images = data.images
    if not 2 <= num_samples <= len(images) // 2:
        raise ValueError(f"noise floor: num_samples must lie in [2, {len(images) // 2}] (half of the "
                         f"{len(images)} {data.name} images); got {num_samples}")
    generator = torch.Generator().manual_seed(seed)
    fids, kids = [], []
    for _ in range(repeats):
        order = torch.randperm(len(images), generator=generator)
        sample, rest = images[order[:num_samples]], images[order[num_samples:]]
        metrics = torch_fidelity.calculate_metrics(
            input1=UInt8Images(sample, space.channels), input2=UInt8Images(rest, space.channels), cache=False,
            fid=True, kid=kid_subsets > 0, kid_subsets=max(kid_subsets, 1),
            kid_subset_size=min(KID_SUBSET_SIZE, num_samples),
            **_fidelity_common(space, device, batch_size))
        fids.append(float(metrics[KEY_METRIC_FID]))
        kids.append(float(metrics.get(KEY_METRIC_KID_MEAN, float("nan"))))
    return NoiseFloor(num_samples, len(images) - num_samples, repeats, float(np.mean(fids)), float(np.std(fids)),
                      float(np.mean(kids)), float(np.std(kids)))
