"""Where FID's reference comes from: the training images, another local image set, or a published file.

``fid_reference`` in a run's config (or ``--fid-reference``) names either an image folder/zip in
EDM's layout, whose statistics are computed once and cached like the training set's
(:func:`cmscale.eval.fid.reference_statistics`), or published statistics: EDM's ``fid-refs/*.npz``
(``mu``, ``sigma``) or EDM2's ``dataset-refs/*.pkl`` (``{"fid": {"mu", "sigma"}, "fd_dinov2": ...}``).
Those are read without running pickled code: the unpickler admits numpy arrays, dtypes and plain
containers, nothing else (the allow-list of :mod:`cmscale.models.edm_pickle` cut to numpy).

Only FID can be scored against published statistics (KID needs the reference's features). Such a
file records neither the resolution nor the extractor, so they are checked from what it does
hold: the feature dimension (Inception's pool features are 2048-d) and a resolution written in its
name (``img512.pkl``, ``imagenet-64x64.npz``).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmscale.eval.features import DIGITS_CNN, DigitsCNNConfig, FeatureSpace
from cmscale.models.edm_pickle import RestrictedUnpickler, _allowed_globals

STATS_SUFFIXES = (".pkl", ".npz")


class ReferenceStatsError(ValueError):
    """Reference statistics that cannot be used; the message names the file and the fix."""


class StatsUnpickler(RestrictedUnpickler):
    """Numpy arrays and plain containers only: a reference file has no business naming anything else."""

    def __init__(self, file, source: str):
        super().__init__(file, source)
        self.allowed = {key: value for key, value in _allowed_globals().items() if key[0].startswith("numpy")}

    def find_class(self, module: str, name: str) -> Any:
        target = self.allowed.get((module, name))
        if target is None:
            raise ReferenceStatsError(
                f"{self.source}: refusing to load {module}.{name}: reference statistics hold numpy arrays only, and "
                "unpickling anything else could run code. Pass EDM's fid-refs .npz or EDM2's dataset-refs .pkl")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise ReferenceStatsError(f"{self.source}: a torch.save file, not reference statistics")


def is_stats_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in STATS_SUFFIXES


def feature_dim(space: FeatureSpace) -> int:
    return DigitsCNNConfig().feature_dim if space.extractor == DIGITS_CNN else int(space.layer)


def name_resolution(path: Path) -> int | None:
    """A resolution written in the file name (``img512``, ``64x64``), if any."""
    match = re.search(r"(\d+)x\1(?!\d)", path.name) or re.search(r"img(\d+)(?!\d)", path.name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class PublishedReference:
    """Reference statistics read from a file: FID only."""

    path: Path
    mu: np.ndarray
    sigma: np.ndarray
    space: FeatureSpace

    @property
    def id(self) -> str:
        return f"file:{self.path.name}"

    def stats(self) -> dict[str, np.ndarray]:
        return {"mu": self.mu, "sigma": self.sigma}


def read_reference_stats(path: str | Path, space: FeatureSpace, pixel_resolution: int) -> PublishedReference:
    """Inception ``mu``/``sigma`` from an EDM ``.npz`` or EDM2 ``.pkl``, checked against ``space`` and
    the resolution of the images they will be compared with."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReferenceStatsError(f"reference statistics {path} not found; download EDM2's dataset-refs/img512.pkl "
                                  "(or EDM's fid-refs/*.npz) on a machine with internet and give its path")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                stats: Any = {key: archive[key] for key in archive.files}
        else:
            with path.open("rb") as handle:
                stats = StatsUnpickler(handle, str(path)).load()
    except ReferenceStatsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as error:
        raise ReferenceStatsError(f"{path}: not readable as reference statistics ({error})") from None
    if isinstance(stats, dict) and isinstance(stats.get("fid"), dict):
        stats = stats["fid"]  # EDM2: one entry per metric
    if not (isinstance(stats, dict) and isinstance(stats.get("mu"), np.ndarray)
            and isinstance(stats.get("sigma"), np.ndarray)):
        raise ReferenceStatsError(f"{path}: no 'mu' and 'sigma' arrays inside (EDM's .npz) nor under 'fid' (EDM2's "
                                  ".pkl); compute statistics with `calculate_metrics.py ref` or point fid_reference at "
                                  "the images")
    mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
    dim = feature_dim(space)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ReferenceStatsError(f"{path}: statistics of {mu.shape[0] if mu.ndim else '?'}-d features, but "
                                  f"{space.extractor} gives {dim}-d features: they come from another feature "
                                  "extractor; use reference statistics made with Inception-v3 (EDM's/EDM2's fid-refs)")
    named = name_resolution(path)
    if named is not None and named != pixel_resolution:
        raise ReferenceStatsError(f"{path}: statistics of {named}x{named} images (by its name), but this run's "
                                  f"samples are {pixel_resolution}x{pixel_resolution}; use the reference file of "
                                  f"the {pixel_resolution}x{pixel_resolution} data set")
    return PublishedReference(path, mu, sigma, space)
