"""EDM2's latent scaling: raw VAE latents <-> the "final" latents a network trains on.

A latent data set stores each image's posterior ``(mean, std)`` under the VAE (EDM2's
``dataset_tool.py encode``). Every training step draws ``z = mean + std * eps`` afresh (the
posterior sample, as EDM2's ``StabilityVAEEncoder.encode_latents``) and whitens it per channel::

    final = z * scale + bias,   scale = final_std / raw_std,   bias = final_mean - raw_mean * scale

with EDM2's constants for Stable Diffusion's VAE (``raw_mean``, ``raw_std`` measured on ImageNet,
``final_mean = 0``, ``final_std = 0.5``). Decoding inverts the whitening before the VAE's decoder.
The arithmetic is float32 with float32 constants, as EDM2's, so both codes give the same latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# EDM2's StabilityVAEEncoder defaults (training/encoders.py), for stabilityai/sd-vae-ft-mse.
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
RAW_STD = (4.17, 4.62, 3.71, 3.28)
FINAL_MEAN = 0.0
FINAL_STD = 0.5


@dataclass(frozen=True)
class LatentScaling:
    """Per-channel affine map from raw VAE latents to the network's latents, and back."""

    raw_mean: tuple[float, ...] = RAW_MEAN
    raw_std: tuple[float, ...] = RAW_STD
    final_mean: float = FINAL_MEAN
    final_std: float = FINAL_STD

    @property
    def channels(self) -> int:
        return len(self.raw_mean)

    def _scale_bias(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = np.float32(self.final_std) / np.asarray(self.raw_std, dtype=np.float32)
        bias = np.float32(self.final_mean) - np.asarray(self.raw_mean, dtype=np.float32) * scale
        as_tensor = lambda values: torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)  # noqa: E731
        return as_tensor(scale), as_tensor(bias)

    def sample(self, mean_std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Final latents from stored ``(mean, std)`` (``N x 2C x h x w``): one posterior draw each."""
        mean, std = mean_std.to(torch.float32).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.whiten(mean + noise * std)

    def whiten(self, raw: torch.Tensor) -> torch.Tensor:
        scale, bias = self._scale_bias(raw)
        return raw.to(torch.float32) * scale + bias

    def unwhiten(self, final: torch.Tensor) -> torch.Tensor:
        """Raw latents (what the VAE's decoder takes) from the network's latents."""
        scale, bias = self._scale_bias(final)
        return (final.to(torch.float32) - bias) / scale
