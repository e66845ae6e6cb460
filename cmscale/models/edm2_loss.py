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

from cmscale.models.precond import EDMPrecond, _per_sample


@dataclass(eq=False)
class EDM2Loss:
    P_mean: float = -0.8
    P_std: float = 1.6
    sigma_data: float = 0.5

    def sample_sigma(self, batch: int, device: torch.device) -> torch.Tensor:
        return (torch.randn(batch, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, model: EDMPrecond, x0: torch.Tensor, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = self.sample_sigma(x0.shape[0], x0.device) if sigma is None else sigma
        noise = torch.randn_like(x0) if noise is None else noise
        denoised = model(x0 + _per_sample(sigma, x0) * noise, sigma, labels)
        logvar = model.net.logvar(sigma.log() / 4)
        squared = (denoised - x0).square().flatten(1).sum(dim=1)
        return self.weight(sigma) / logvar.exp() * squared + logvar * x0[0].numel()
