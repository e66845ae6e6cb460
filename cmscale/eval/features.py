"""Feature spaces for FID: torch-fidelity's Inception-v3 for real data, a domain CNN for digits.

FID compares Gaussians fitted to features of real and generated images,
``FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))``; torch-fidelity computes it. What
this module decides is *which features*:

- ``inception-v3-compat`` (CIFAR-10, image folders): torch-fidelity's port of the TF Inception
  used by every published FID, 2048-d pool features. Its weights are never downloaded here:
  they are looked up in torch-fidelity's cache (``torch.hub.get_dir()/checkpoints``), in the
  cmscale cache, or at a path the user gives, because cluster nodes are often offline.
- ``digits-cnn`` (the embedded 8x8 digits, upsampled): Inception on 16x16 digits measures mostly
  the upsampling, so a small CNN classifier trained on digits gives the feature space
  (64-d penultimate layer). It trains in seconds on one CPU thread from a fixed seed, is cached on
  disk under a hash of its training config, and is registered with torch-fidelity's
  ``register_feature_extractor``, so FID is computed by torch-fidelity in its feature space.

A :class:`FeatureSpace` names the extractor, its version hash and its weights file; eval rows
record the extractor and a reference id built from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from cmscale.eval.cache import cache_root, locked

DIGITS_CNN = "digits-cnn"
INCEPTION = "inception-v3-compat"
EXTRACTORS = (DIGITS_CNN, INCEPTION)
INCEPTION_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------------------------
# The digits feature extractor


@dataclass(frozen=True)
class DigitsCNNConfig:
    """Everything that determines the digits CNN's weights; its hash names the cached file.

    Bump ``version`` when the architecture or the training code changes, so old caches are not
    reused for a different network.
    """

    resolution: int = 16
    width: int = 8
    feature_dim: int = 64
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    holdout_fraction: float = 0.2
    version: int = 1

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:8]


class DigitsCNN(nn.Module):
    """conv(1->w) pool conv(w->2w) pool conv(2w->4w) -> linear(feature_dim) -> linear(10).

    Inputs are floats in [-1, 1] at ``resolution`` (16x16: 16 -> 8 -> 4 spatially). SiLU rather
    than ReLU keeps every feature unit alive, so the feature covariance has full rank.
    """

    def __init__(self, resolution: int = 16, width: int = 8, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.resolution = resolution
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(4 * width * (resolution // 4) ** 2, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digits_cnn(config: DigitsCNNConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the classifier on a seeded split of digits; returns (state_dict, diagnostics).

    Runs on the CPU with one thread and its own generator, so the weights are the same on every
    machine with the same torch build and the caller's RNG streams are untouched.
    """
    from cmscale.data import load_digits

    data = load_digits(config.resolution)
    x_all, y_all = data.as_float(), data.labels
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(data), generator=generator)
    n_holdout = int(round(config.holdout_fraction * len(data)))
    holdout, train = order[:n_holdout], order[n_holdout:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.time()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = DigitsCNN(config.resolution, config.width, config.feature_dim)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        for _ in range(config.epochs):
            permutation = train[torch.randperm(len(train), generator=generator)]
            for start in range(0, len(permutation), config.batch_size):
                batch = permutation[start : start + config.batch_size]
                loss = F.cross_entropy(model(x_all[batch]), y_all[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            correct = (model(x_all[holdout]).argmax(1) == y_all[holdout]).float()
            accuracy = correct.mean().item() if n_holdout else float("nan")
    finally:
        torch.set_num_threads(threads)
    return model.state_dict(), {"holdout_accuracy": accuracy, "train_seconds": time.time() - started}


def digits_cnn_weights(config: DigitsCNNConfig | None = None) -> Path:
    """Path of the trained digits CNN, training it once (under a lock) if it is not cached."""
    config = config or DigitsCNNConfig()
    path = cache_root() / "extractors" / f"{DIGITS_CNN}-{config.digest()}.pt"
    if path.is_file():
        return path
    with locked(path):
        if path.is_file():  # another job trained it while we waited for the lock
            return path
        state_dict, diagnostics = train_digits_cnn(config)
        tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"config": asdict(config), "state_dict": state_dict, **diagnostics}, tmp_path)
        os.replace(tmp_path, path)
    return path


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of :class:`DigitsCNN`: uint8 images in, 64-d features out.

    Takes ``Bx1xHxW`` (or ``Bx3xHxW``, averaged to grey) uint8 batches at any resolution and
    resizes them to the CNN's training resolution, as torch-fidelity's Inception resizes to 299.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name}: feature_extractor_weights_path is required (see "
                             "cmscale.eval.features.digits_cnn_weights)")
        payload = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        config = DigitsCNNConfig(**payload["config"])
        self.cnn = DigitsCNN(config.resolution, config.width, config.feature_dim)
        self.cnn.load_state_dict(payload["state_dict"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "features", "kid": "features", "prc": "features", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

    def forward(self, x: torch.Tensor):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected uint8 images Bx1xHxW or Bx3xHxW, got {tuple(x.shape)} {x.dtype}")
        x = x.float() / 127.5 - 1.0
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        size = self.cnn.resolution
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        features = self.cnn.features(x)
        provided = {"features": features, "logits": self.cnn.head(features)}
        return tuple(provided[name] for name in self.features_list)


# ----------------------------------------------------------------------------------------------
# Inception weights (never downloaded)


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The Inception weights are not on disk; the message lists where we looked and the fix."""


def inception_weight_locations() -> list[Path]:
    """Where the weights are looked for, in order: torch-fidelity's cache, then cmscale's."""
    return [
        Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME,
        cache_root() / "weights" / INCEPTION_FILENAME,
    ]


def resolve_inception_weights(user_path: str | os.PathLike | None = None) -> Path:
    """The Inception-v3 weights file, from ``user_path`` or the caches; never touches the network."""
    if user_path is not None:
        path = Path(user_path).expanduser()
        if path.is_file():
            return path
        raise InceptionWeightsNotFoundError(
            f"Inception weights not found at {path} (given by --inception-weights or eval.inception_weights). "
            f"{_inception_fix()}"
        )
    locations = inception_weight_locations()
    for path in locations:
        if path.is_file():
            return path
    looked = "\n".join(f"  - {path}" for path in locations)
    raise InceptionWeightsNotFoundError(
        f"Inception-v3 weights for FID ({INCEPTION}) not found; looked in:\n{looked}\n{_inception_fix()}"
    )


def _inception_fix() -> str:
    return (
        f"To provide them (this machine may be offline, so cmscale never downloads): on a machine with internet "
        f"download {URL_INCEPTION_V3} and copy it to one of the locations above, or pass its path with "
        f"`cmscale eval --inception-weights PATH` or the run config setting `eval.inception_weights = \"PATH\"`."
    )


# ----------------------------------------------------------------------------------------------
# Feature spaces


_FILE_DIGESTS: dict[tuple[str, int, float], str] = {}


def file_digest(path: Path) -> str:
    """First 8 hex digits of the file's sha256 (torch hub's convention for weight files)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_DIGESTS[key] = digest.hexdigest()[:8]
    return _FILE_DIGESTS[key]


@dataclass(frozen=True)
class FeatureSpace:
    """One extractor at one version. ``registered_name`` is its name in torch-fidelity's registry
    (and so in torch-fidelity's cache file names); ``extractor`` is what eval rows record."""

    extractor: str
    version: str  # digits-cnn: hash of its training config; inception: sha256 prefix of the weights
    weights_path: Path
    layer: str
    channels: int  # image channels the extractor takes

    @property
    def registered_name(self) -> str:
        return f"{self.extractor}-{self.version}"

    def register(self) -> None:
        if self.registered_name not in FEATURE_EXTRACTORS_REGISTRY:
            cls = DigitsFeatureExtractor if self.extractor == DIGITS_CNN else FeatureExtractorInceptionV3
            register_feature_extractor(self.registered_name, cls)

    def fidelity_kwargs(self) -> dict:
        """The keyword arguments that select this feature space in torch-fidelity calls."""
        self.register()
        return {
            "feature_extractor": self.registered_name,
            "feature_extractor_weights_path": str(self.weights_path),
            "feature_layer_fid": self.layer,
        }


def feature_space(dataset: str, extractor: str = "auto", inception_weights: str | os.PathLike | None = None,
                  digits_config: DigitsCNNConfig | None = None) -> FeatureSpace:
    """The feature space for FID on ``dataset``; ``extractor`` 'auto' picks digits-cnn for digits.

    Raises :class:`InceptionWeightsNotFoundError` (before any data is read or any network call)
    when Inception is needed and its weights are absent.
    """
    name = (DIGITS_CNN if dataset == "digits" else INCEPTION) if extractor == "auto" else extractor
    if name == DIGITS_CNN:
        if dataset != "digits":
            raise ValueError(f"eval.extractor = {DIGITS_CNN!r} is trained on digits and only measures digits; "
                             f"for dataset {dataset!r} use 'auto' or {INCEPTION!r}")
        config = digits_config or DigitsCNNConfig()
        return FeatureSpace(DIGITS_CNN, config.digest(), digits_cnn_weights(config), "features", channels=1)
    if name == INCEPTION:
        path = resolve_inception_weights(inception_weights)
        return FeatureSpace(INCEPTION, file_digest(path), path, "2048", channels=3)
    raise ValueError(f"eval.extractor = {extractor!r} is not supported; choose 'auto', {DIGITS_CNN!r} or {INCEPTION!r}")
