"""EDM2's training loss with the learned uncertainty weighting (Karras et al. 2024, equations 14-16 and 21).

    ln sigma ~ N(P_mean, P_std^2),   n ~ N(0, I),   lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
    L = lambda(sigma) / exp(u(sigma)) || D(x0 + sigma n, sigma) - x0 ||^2 + u(sigma) * dim(x0)

per sample, where u(sigma) is the network's log-variance head (:meth:`cmscale.models.edm2.EDM2Net.logvar`
at c_noise = ln(sigma)/4). EDM2 sums its per-element loss over the batch; this is that sum per
sample (the same gradient direction; the trainer averages over the batch). EDM2's presets: P_mean
-0.8, P_std 1.6 at ImageNet 64; -0.4, 1.0 in latent space at 512.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmscale.models.losses import EDMLoss
from cmscale.models.precond import EDMPrecond


@dataclass(eq=False)
class EDM2Loss(EDMLoss):
    """EDM's loss (the same sigma draw and lambda) under the learned uncertainty u(sigma) above."""

    P_mean: float = -0.8
    P_std: float = 1.6

    def __call__(self, model: EDMPrecond, x0: torch.Tensor, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma, denoised = self.denoise(model, x0, sigma, noise, labels)
        logvar = model.net.logvar(sigma.log() / 4)
        squared = (denoised - x0).square().flatten(1).sum(dim=1)
        return self.weight(sigma) / logvar.exp() * squared + logvar * x0[0].numel()
