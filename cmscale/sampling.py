"""Drawing images from a trained method: the network of a final checkpoint in its method's wrapper,
autoguidance's weaker network, class-balanced labels, guidance, and the method's sampler.

Training assembles a method in :mod:`cmscale.methods`; evaluation samples through this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmscale.checkpoint import metadata_mismatches
from cmscale.config import RunConfig
from cmscale.methods import TeacherCheckpointError, recipe_of, wrap_network
from cmscale.models.labels import label_vector
from cmscale.models.presets import build_unet


def model_from_checkpoint(config: RunConfig, payload: dict[str, Any], device: torch.device | str) -> nn.Module:
    """The network of a final checkpoint (``ckpt/final.pt``'s payload) in the method's wrapper, frozen."""
    from cmscale.models.presets import build_network as network_from_record
    from cmscale.models.presets import defined_preset

    stored = payload.get("preset") or config.preset
    if payload.get("model_spec"):  # a spec-defined model (its checkpoint carries the family and width)
        preset = defined_preset(stored, **payload["model_spec"])
    else:
        preset = config.network_preset() if stored == config.preset else stored  # a guide may be another preset
    if payload.get("architecture"):  # an imported EDM/EDM2 network: its own constructor arguments
        net = network_from_record(payload["architecture"])
    else:
        net = build_unet(preset, payload.get("resolution", config.resolution), payload["img_channels"],
                         label_dim=payload.get("label_dim", config.label_dim))
    net.load_state_dict(payload["net"])
    return wrap_network(config, net).to(device).eval().requires_grad_(False)


def guide_from_checkpoint(config: RunConfig, img_channels: int, device: torch.device | str) -> nn.Module | None:
    """Autoguidance's weaker network (``config.guide_ckpt``) in the run's wrapper, frozen; None without one.

    Its preset may differ (a smaller size); its resolution, channels and label_dim must be the run's."""
    if config.guide_ckpt is None:
        return None
    path = Path(config.guide_ckpt)
    if not path.is_file():
        raise TeacherCheckpointError(f"guide_ckpt {path} not found; point it at a finished run's ckpt/final.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    expected = {"resolution": config.resolution, "img_channels": img_channels, "label_dim": config.label_dim}
    problems = metadata_mismatches(payload, expected)
    if problems:
        raise TeacherCheckpointError(f"guide_ckpt {path} does not fit this run: {'; '.join(problems)}; autoguidance "
                                     "needs a network of the same resolution, channels and label_dim")
    return model_from_checkpoint(config, payload, device)


def balanced_labels(start: int, count: int, label_dim: int, device: torch.device | str) -> torch.Tensor | None:
    """Class labels of samples ``start .. start + count - 1``: sample i has class i mod label_dim, so every
    class appears equally often in a multiple of label_dim samples (None when unconditional)."""
    if not label_dim:
        return None
    return torch.arange(start, start + count, device=device) % label_dim


class Guided(nn.Module):
    """A model called with fixed class labels, and guided: out = out_u + w (out_c - out_u).

    ``out_c`` is the model with ``labels``; ``out_u`` is ``guide`` with the same labels (autoguidance,
    EDM2) or, without a guide, the model with the all-zero label (classifier-free guidance on the
    branch label dropout trained). w = 1 is the conditional model alone (one evaluation).
    """

    def __init__(self, model: nn.Module, labels: torch.Tensor | None, guidance: float = 1.0,
                 guide: nn.Module | None = None, label_dim: int = 0):
        super().__init__()
        self.model, self.guide = model, guide
        self.guidance = guidance
        self.labels = None if labels is None else label_vector(labels, label_dim, labels.shape[0], torch.zeros(()))
        self.evaluations = 1 if guidance == 1 else 2

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        labels = None if self.labels is None else self.labels.to(x.device, x.dtype)
        conditional = self.model(x, time, labels)
        if self.guidance == 1:
            return conditional
        if self.guide is not None:
            reference = self.guide(x, time, labels)
        else:
            reference = self.model(x, time, None if labels is None else torch.zeros_like(labels))
        return reference.lerp(conditional, self.guidance)


def sample(config: RunConfig, model: nn.Module, shape: tuple[int, ...], steps: int, generator: torch.Generator,
           device: torch.device | str, labels: torch.Tensor | None = None,
           guide: nn.Module | None = None) -> tuple[torch.Tensor, int]:
    """Draw images with the method's sampler: Heun for EDM teachers, n-step CM sampling otherwise.

    ``labels`` (one per image) condition a class-conditional model, guided by ``config.guidance``
    (with ``guide``, autoguidance); the returned count of network evaluations includes the guide's."""
    if labels is None and config.guidance == 1:
        return recipe_of(config).sample(config, model, shape, steps, generator, device)
    guided = Guided(model, labels, config.guidance, guide, config.label_dim)
    images, nfe = recipe_of(config).sample(config, guided, shape, steps, generator, device)
    return images, nfe * guided.evaluations
