"""A local diffusers ``AutoencoderKL`` (e.g. ``sd-vae-ft-mse``): pixels <-> EDM2's latents.

The VAE is read from a folder on disk (``config.json`` + weights, as ``save_pretrained`` writes
it); nothing is fetched from a hub (``HF_HUB_OFFLINE`` is set before diffusers is imported, and
``local_files_only``). diffusers is the optional extra ``cmscale[latent]`` and imported only here.

As EDM2's ``StabilityVAEEncoder``: the encoder takes pixels scaled to [0, 1] and returns the
posterior's ``(mean, std)`` (what a latent data set stores); the decoder's output is clamped to
[0, 1] and scaled to uint8. The whitening between raw and network latents is
:class:`cmscale.data.latents.LatentScaling`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cmscale.data.latents import LatentScaling

VAE_CLASS = "AutoencoderKL"
VAE_FIX = ("vae_path must be a local folder written by diffusers' AutoencoderKL.save_pretrained (config.json and "
           "diffusion_pytorch_model.safetensors), e.g. stabilityai/sd-vae-ft-mse downloaded on a machine with "
           "internet (`huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir sd-vae-ft-mse`)")


class VAEError(ValueError):
    """The VAE folder cannot be used; the message names the file and the fix."""


def check_vae_folder(path: str | os.PathLike) -> Path:
    """The folder, after checking (without importing diffusers) that it holds an AutoencoderKL."""
    folder = Path(path).expanduser()
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise VAEError(f"VAE folder {folder} not found; {VAE_FIX}")
    if not config_path.is_file():
        raise VAEError(f"{config_path} not found: {folder} is not a diffusers model folder; {VAE_FIX}")
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except (ValueError, AttributeError) as error:
        raise VAEError(f"{config_path} is not valid JSON ({error}); {VAE_FIX}") from None
    if class_name != VAE_CLASS:
        raise VAEError(f"{config_path} describes a {class_name!r}, not an {VAE_CLASS}; {VAE_FIX}")
    return folder


def vae_downsampling(path: str | os.PathLike) -> int:
    """How many pixels one latent spans per side (8 for Stable Diffusion's VAE), from config.json."""
    config = json.loads((check_vae_folder(path) / "config.json").read_text())
    return 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)


def load_vae(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The AutoencoderKL in ``path`` in eval mode, frozen, on ``device``."""
    folder = check_vae_folder(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise VAEError("latent runs need diffusers: pip install 'cmscale[latent]'") from None
    diffusers_logging.set_verbosity_error()  # its advice to install accelerate is noise in every job log
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise VAEError(f"{folder}: diffusers could not load the AutoencoderKL ({error}); {VAE_FIX}") from None
    return vae.eval().requires_grad_(False).to(device)


class VAECodec:
    """Pixels (uint8) -> stored ``(mean, std)``, and network latents -> pixels (uint8), as EDM2."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu",
                 scaling: LatentScaling | None = None, batch_size: int = 8):
        self.path = Path(path)
        self.device = torch.device(device)
        self.vae = load_vae(path, self.device)
        self.downsampling = vae_downsampling(path)
        self.scaling = scaling or LatentScaling()
        self.batch_size = batch_size

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``N x 3 x H x W`` -> float32 ``N x 2C x H/8 x W/8``: the posterior's mean, then std."""
        pixels = images.to(self.device, torch.float32) / 255
        chunks = []
        for batch in pixels.split(self.batch_size):
            posterior = self.vae.encode(batch).latent_dist
            chunks.append(torch.cat([posterior.mean, posterior.std], dim=1))
        return torch.cat(chunks).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Network latents -> uint8 pixels on the CPU (non-finite latents decode as zeros)."""
        raw = self.scaling.unwhiten(torch.nan_to_num(latents.to(self.device, torch.float32)))
        pixels = torch.cat([self.vae.decode(batch).sample for batch in raw.split(self.batch_size)])
        return pixels.clamp(0, 1).mul(255).to(torch.uint8).cpu()
