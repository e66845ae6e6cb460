"""The public loader of imported teachers: ``load_denoiser(path)`` -> D(x; sigma, class_labels) in fp32.

    from cmscale.teacher import load_denoiser
    denoiser = load_denoiser("edm2-img64-s.pt")          # written by `cmscale teacher import`
    denoised = denoiser(x, sigma, class_labels=labels)   # labels: int [N] or one-hot [N, label_dim]

``path`` is a cmscale teacher checkpoint (from ``cmscale teacher import``, or an EDM run's
``ckpt/final.pt``) or an EDM / EDM2 network pickle itself, imported in memory with the same
restricted unpickler (no code from the pickle runs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cmscale.models.edm_import import import_edm_network, teacher_checkpoint
from cmscale.models.edm_pickle import EDMPickleError
from cmscale.models.precond import EDMPrecond
from cmscale.models.presets import build_network, build_unet, defined_preset


class Denoiser(nn.Module):
    """EDM's denoiser around an imported network: D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4, labels).

    ``label_dim``, ``img_resolution``, ``img_channels``, ``sigma_data`` and ``encoder`` (EDM2's data
    encoder, or None) describe what it expects; ``net`` is the bare network.
    """

    def __init__(self, net: nn.Module, sigma_data: float, label_dim: int = 0, encoder: dict | None = None):
        super().__init__()
        self.precond = EDMPrecond(net, sigma_data)
        self.net = net
        self.sigma_data = sigma_data
        self.label_dim = label_dim
        self.img_resolution = net.img_resolution
        self.img_channels = net.img_channels
        self.encoder = encoder

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if class_labels is not None and not self.label_dim:
            raise ValueError("class_labels given, but this network is unconditional (label_dim 0); pass none")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return self.precond(x, sigma, class_labels)


def _read_checkpoint(path: Path) -> dict:
    if path.suffix == ".pkl":
        return teacher_checkpoint(import_edm_network(path), path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: teacher checkpoint not found (write one with `cmscale teacher import`)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "net" not in checkpoint:
        raise EDMPickleError(f"{path}: not a cmscale checkpoint (no 'net' state dict); write one with "
                             "`cmscale teacher import PICKLE --out FILE.pt`")
    return checkpoint


def load_denoiser(path: str | Path) -> Denoiser:
    """The imported network's denoiser, fp32, in eval mode, with its weights loaded strictly."""
    checkpoint = _read_checkpoint(Path(path))
    architecture = checkpoint.get("architecture")
    shape = (int(checkpoint.get("resolution") or 0), int(checkpoint.get("img_channels") or 0))
    if architecture:  # an imported network: its constructor arguments
        net = build_network(architecture)
    elif checkpoint.get("model_spec"):  # a run of a spec-defined size
        net = build_unet(defined_preset(checkpoint["preset"], **checkpoint["model_spec"]), *shape,
                         label_dim=int(checkpoint.get("label_dim") or 0))
    elif checkpoint.get("preset"):
        net = build_unet(checkpoint["preset"], *shape, label_dim=int(checkpoint.get("label_dim") or 0))
    else:
        raise EDMPickleError(f"{path}: the checkpoint has neither 'architecture' nor 'preset'; re-import the pickle "
                             "with `cmscale teacher import`")
    net.load_state_dict(checkpoint["net"], strict=True)
    label_dim = int(checkpoint.get("label_dim") or getattr(net, "label_dim", 0) or 0)
    denoiser = Denoiser(net.float(), float(checkpoint.get("sigma_data", 0.5)), label_dim, checkpoint.get("encoder"))
    return denoiser.eval().requires_grad_(False)
