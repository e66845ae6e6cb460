"""Training losses: EDM diffusion (teacher), ECT, and sCM (sCT and sCD).

Each loss is a small class: hyperparameters in ``__init__``, the math in ``__call__``, which
returns one loss value per sample (the trainer averages). ``t`` and ``noise`` may be passed
explicitly so that tests can compare losses on the same draw.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond, TrigFlowPrecond, _per_sample
from cmscale.models.unet import PositionalEmbedding


def _sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


@contextmanager
def same_random_state(device: torch.device):
    """Run a block with the RNG state as it is now, so two forwards draw the same dropout masks."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


class EDMLoss:
    """EDM denoising loss (Karras et al. 2022), summed over pixels per sample.

        ln sigma ~ N(P_mean, P_std^2),   n ~ N(0, I)
        L = lambda(sigma) || D(x0 + sigma n, sigma) - x0 ||^2,   lambda = (sigma^2 + sd^2) / (sigma sd)^2
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, batch: int, device: torch.device) -> torch.Tensor:
        return (torch.randn(batch, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, model: EDMPrecond, x0: torch.Tensor, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        sigma = self.sample_sigma(x0.shape[0], x0.device) if sigma is None else sigma
        noise = torch.randn_like(x0) if noise is None else noise
        denoised = model(x0 + _per_sample(sigma, x0) * noise, sigma)
        return self.weight(sigma) * _sum_per_sample((denoised - x0) ** 2)


class ECTLoss:
    """Easy Consistency Tuning (Geng et al. 2024), the CIFAR-10 setting of locuslab/ect.

        ln t ~ N(P_mean, P_std^2);   stage s = iteration // iters_per_stage
        r = max(0, t (1 - q^-(s+1) n(t))),   n(t) = 1 + k sigmoid(-b t)  ('sigmoid')  or 1  ('const')
                                             (q^-(s+1) floored at 2^-20, the fp32 limit)
        x_t = x0 + t n,  x_r = x0 + r n  (shared noise n)
        d = || f(x_t, t) - sg[f(x_r, r)] ||^2  (per-sample sum; f(x_r, 0) := x0)
        L = (sqrt(d + c^2) - c) * w(t, r),   w = 1 / (t - r)  ('inv_dt')  or  (t^2 + sd^2) / (t sd)^2  ('snr')

    The target runs under no_grad with the same random state as the online pass, so dropout masks
    match. At r = 0 the target is the clean image and the loss is the EDM denoising objective
    re-weighted: L = w(t, 0) phi(d) with phi(d) = sqrt(d + c^2) - c and
    d = ||D(x0 + t n, t) - x0||^2 = EDMLoss(t) / lambda(t), see :meth:`from_diffusion_loss`.
    With the sigmoid mapping, stage 0 and q = 2, r = 0 for every t <= ln(k - 1) (about 1.95).
    """

    def __init__(self, P_mean: float = -1.1, P_std: float = 2.0, sigma_data: float = 0.5, q: float = 2.0,
                 k: float = 8.0,
                 b: float = 1.0, c: float = 0.0, mapping: str = "sigmoid", weighting: str = "inv_dt",
                 iters_per_stage: int = 1000):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.q = q
        self.k = k
        self.b = b
        self.c = c
        self.mapping = mapping
        self.weighting = weighting
        self.iters_per_stage = max(1, iters_per_stage)
        self.stage = 0

    def set_iteration(self, iteration: int) -> None:
        self.stage = iteration // self.iters_per_stage

    def sample_t(self, batch: int, device: torch.device) -> torch.Tensor:
        """ln t ~ N(P_mean, P_std^2)."""
        return (torch.randn(batch, device=device) * self.P_std + self.P_mean).exp()

    # Floor of the decay q^-(s+1): beyond about 20 halvings (t - r)/t drops under fp32's resolution,
    # r rounds to t and the 1/(t - r) weight divides by zero. ECT's own runs stop well before that.
    MIN_DECAY = 2.0**-20

    def decay(self) -> float:
        """q^-(s+1): (t - r)/t for the 'const' mapping, halving per stage at q = 2 (floored at MIN_DECAY)."""
        return max(self.q ** -(self.stage + 1.0), self.MIN_DECAY)

    def t_to_r(self, t: torch.Tensor) -> torch.Tensor:
        n = 1 + self.k * torch.sigmoid(-self.b * t) if self.mapping == "sigmoid" else torch.ones_like(t)
        return (t * (1 - self.decay() * n)).clamp(min=0)

    def weight(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.weighting == "inv_dt":
            return 1 / (t - r)
        return (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2

    def distance(self, squared: torch.Tensor) -> torch.Tensor:
        return (squared + self.c**2).sqrt() - self.c

    def from_diffusion_loss(self, edm_loss: torch.Tensor, t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The ECT loss at r = 0 from the EDM loss on the same draw: w(t, 0) phi(EDMLoss / lambda(t))."""
        return self.distance(edm_loss / lam) * self.weight(t, torch.zeros_like(t))

    def __call__(self, model: EDMPrecond, x0: torch.Tensor, t: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        r = self.t_to_r(t)
        with same_random_state(x0.device):
            online = model(x0 + _per_sample(t, x0) * noise, t)
        with torch.no_grad():
            # The target runs at r itself (as in locuslab/ect); r = 0 rows only need a finite
            # c_noise = ln(r)/4 here, since they are replaced by the clean image below.
            r_safe = r.clamp(min=1e-12)
            target = model(x0 + _per_sample(r_safe, x0) * noise, r_safe)
            target = torch.where(_per_sample(r, x0) > 0, torch.nan_to_num(target), x0)
        return self.distance(_sum_per_sample((online - target) ** 2)) * self.weight(t, r)


class AdaptiveWeight(nn.Module):
    """sCM's learned log-variance w_phi(t): a positional embedding of t and one linear layer."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.embedding = PositionalEmbedding(channels)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embedding(t.reshape(-1))).reshape(-1)


class SCMLoss:
    """Simplified continuous-time consistency loss, sCT or sCD (Lu & Song 2024).

        tau ~ N(P_mean, P_std^2),  t = arctan(exp(tau) / sd),  z ~ N(0, sd^2 I),  x_t = cos t x0 + sin t z
        dx_t/dt = cos t z - sin t x0                       (sCT: from the data pair)
                = sd F_teacher(x_t / sd, t)                (sCD: the teacher's PF-ODE)
        sd cos t sin t dF-/dt = JVP of F- at (x_t/sd, t) along (cos t sin t dx_t/dt, sd cos t sin t)
        g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt),   g <- g / (||g|| + c)
        L = exp(-w(t)) / D * || F - F- - g ||^2 / (sd tan t) + w(t)

    F- is the current network under stop-gradient (not an EMA), r = min(1, iteration / warmup)
    is the tangent warm-up, w(t) is the learned log-variance (:class:`AdaptiveWeight`), and
    1 / (sd tan t) is the prior weight. The JVP runs in fp32 under no_grad.
    """

    def __init__(self, mode: str = "sct", P_mean: float = -1.0, P_std: float = 1.4, sigma_data: float = 0.5,
                 warmup_iters: int = 10_000, tangent_norm_c: float = 0.1, tangent_norm: str = "l2",
                 sigma_max: float = 80.0, sigma_min: float = 0.002, weight_channels: int = 128):
        if mode not in ("sct", "scd"):
            raise ValueError(f"mode must be 'sct' or 'scd', got {mode!r}")
        self.mode = mode
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.warmup_iters = warmup_iters
        self.tangent_norm_c = tangent_norm_c
        self.tangent_norm = tangent_norm
        self.t_min = math.atan(sigma_min / sigma_data)
        self.t_max = math.atan(sigma_max / sigma_data)
        self.adaptive_weight = AdaptiveWeight(weight_channels)
        self.warmup = 1.0 if warmup_iters == 0 else 0.0

    def set_iteration(self, iteration: int) -> None:
        self.warmup = 1.0 if self.warmup_iters == 0 else min(1.0, iteration / self.warmup_iters)

    def sample_t(self, batch: int, device: torch.device) -> torch.Tensor:
        tau = torch.randn(batch, device=device) * self.P_std + self.P_mean
        return torch.atan(tau.exp() / self.sigma_data).clamp(self.t_min, self.t_max)

    def tangent(self, model, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
        """(F-, sd cos t sin t dF-/dt) by forward-mode AD, in fp32 (or fp64 if given) and without a graph.

        d/dt F(x_t/sd, t) = J_x (dx_t/dt / sd) + J_t; scaling both tangents by sd cos t sin t keeps
        them O(1) near t = pi/2 (where dx_t/dt is large) and returns the product g needs.
        """
        sd = self.sigma_data
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        cos_t, sin_t = _per_sample(t.cos(), x_t), _per_sample(t.sin(), x_t)
        with torch.no_grad(), torch.autocast(device_type="cuda" if x_t.is_cuda else "cpu", enabled=False):
            return torch.func.jvp(
                model.F,
                (x_t.to(dtype) / sd, t.to(dtype)),
                ((cos_t * sin_t * dxt_dt).to(dtype), (sd * t.cos() * t.sin()).to(dtype)),
            )

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        norm = _sum_per_sample(g**2).sqrt()
        if self.tangent_norm == "rms":
            norm = norm / math.sqrt(g[0].numel())
        return g / (_per_sample(norm, g) + self.tangent_norm_c)

    def __call__(self, model: TrigFlowPrecond | EDMAsTrigFlow, x0: torch.Tensor, teacher: EDMAsTrigFlow | None = None,
                 t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        sd = self.sigma_data
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        z = (torch.randn_like(x0) if noise is None else noise) * sd
        cos_t, sin_t = _per_sample(t.cos(), x0), _per_sample(t.sin(), x0)
        x_t = cos_t * x0 + sin_t * z
        if self.mode == "sct":
            dxt_dt = cos_t * z - sin_t * x0
        else:
            if teacher is None:
                raise ValueError("sCD needs a teacher")
            with torch.no_grad():
                dxt_dt = sd * teacher.F(x_t / sd, t)
        with same_random_state(x0.device):
            F_theta = model.F(x_t / sd, t)
        F_minus, scaled_dF_dt = self.tangent(model, x_t, t, dxt_dt)
        g = -cos_t**2 * (sd * F_minus - dxt_dt) - self.warmup * (cos_t * sin_t * x_t + scaled_dF_dt)
        g = self.normalize(g)
        squared = _sum_per_sample((F_theta - F_minus - g) ** 2) / x0[0].numel()
        log_var = self.adaptive_weight(t)
        return squared / (sd * t.tan()) * torch.exp(-log_var) + log_var
