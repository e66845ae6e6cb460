"""Training losses: EDM diffusion (teacher), ECT, and sCM (sCT and sCD).

Each loss is a small class: hyperparameters in ``__init__``, the math in ``__call__``, which
returns one loss value per sample (the trainer averages). ``t`` and ``noise`` may be passed
explicitly so that tests can compare losses on the same draw.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn import functional as F

from cmscale.models.dropout import clear_masks, record_masks, replay_masks
from cmscale.models.edm2 import no_forced_weight_norm
from cmscale.models.jvp import lean_jvp
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


@dataclass(eq=False)
class EDMLoss:
    """EDM denoising loss (Karras et al. 2022), summed over pixels per sample.

        ln sigma ~ N(P_mean, P_std^2),   n ~ N(0, I)
        L = lambda(sigma) || D(x0 + sigma n, sigma) - x0 ||^2,   lambda = (sigma^2 + sd^2) / (sigma sd)^2
    """

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def sample_sigma(self, batch: int, device: torch.device) -> torch.Tensor:
        return (torch.randn(batch, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, model: EDMPrecond, x0: torch.Tensor, sigma: torch.Tensor | None,
                noise: torch.Tensor | None, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, D(x0 + sigma n, sigma)), drawing sigma and then n where they are not given."""
        sigma = self.sample_sigma(x0.shape[0], x0.device) if sigma is None else sigma
        noise = torch.randn_like(x0) if noise is None else noise
        return sigma, model(x0 + _per_sample(sigma, x0) * noise, sigma, labels)

    def __call__(self, model: EDMPrecond, x0: torch.Tensor, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma, denoised = self.denoise(model, x0, sigma, noise, labels)
        return self.weight(sigma) * _sum_per_sample((denoised - x0) ** 2)


@dataclass(eq=False)
class ECTLoss:
    """Easy Consistency Tuning (Geng et al. 2024), the CIFAR-10 setting of locuslab/ect.

        ln t ~ N(P_mean, P_std^2);   stage s = iteration // iters_per_stage
        r = max(0, t (1 - q^-(s+1) n(t))),   n(t) = 1 + k sigmoid(-b t)  ('sigmoid')  or 1  ('const')
                                             (q^-(s+1) floored at 2^-20, the fp32 limit)
        x_t = x0 + t n,  x_r = x0 + r n  (shared noise n)
        d = || f(x_t, t) - sg[f(x_r, r)] ||^2  (per-sample sum; f(x_r, 0) := x0)
        L = (sqrt(d + c^2) - c) * w(t, r),   w = 1 / (t - r)  ('inv_dt')  or  (t^2 + sd^2) / (t sd)^2
                                             ('snrpk', ImageNet-64, = 1/t^2 + 1/sd^2; 'snr' is the same)

    The target runs under no_grad and only on the rows with r > 0 (none: no target pass at all);
    rows with r = 0 take the clean image. Its dropout masks are the online pass's own, recorded
    and replayed by row (:mod:`cmscale.models.dropout`), not redrawn from a restored RNG state, so
    the loss equals the full-batch computation with matching masks on the same draws. At r = 0 the
    loss is the EDM denoising objective re-weighted: L = w(t, 0) phi(d) with phi(d) = sqrt(d + c^2) - c
    and d = ||D(x0 + t n, t) - x0||^2 = EDMLoss(t) / lambda(t), see :meth:`from_diffusion_loss`.
    With the sigmoid mapping, stage 0 and q = 2, r = 0 for every t <= ln(k - 1) (about 1.95), i.e.
    for about 81% of the rows (:meth:`target_row_fraction`), so a stage-0 step skips most of the target.
    """

    P_mean: float = -1.1
    P_std: float = 2.0
    sigma_data: float = 0.5
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    c: float = 0.0
    mapping: str = "sigmoid"
    weighting: str = "inv_dt"
    iters_per_stage: int = 1000
    stage: int = field(default=0, init=False)  # set per step by set_iteration

    def __post_init__(self) -> None:
        self.iters_per_stage = max(1, self.iters_per_stage)

    def set_iteration(self, iteration: int) -> None:
        self.stage = iteration // self.iters_per_stage

    def sample_t(self, batch: int, device: torch.device) -> torch.Tensor:
        """ln t ~ N(P_mean, P_std^2)."""
        return (torch.randn(batch, device=device) * self.P_std + self.P_mean).exp()

    # Floor of the decay q^-(s+1): beyond about 20 halvings (t - r)/t drops under fp32's resolution,
    # r rounds to t and the 1/(t - r) weight divides by zero. ECT's own runs stop well before that.
    MIN_DECAY = 2.0**-20

    def decay(self, stage: int | None = None) -> float:
        """q^-(s+1): (t - r)/t for the 'const' mapping, halving per stage at q = 2 (floored at MIN_DECAY)."""
        return max(self.q ** -((self.stage if stage is None else stage) + 1.0), self.MIN_DECAY)

    def target_row_fraction(self, stage: int) -> float:
        """P(r > 0) at ``stage`` under ln t ~ N(P_mean, P_std^2): the expected share of rows the target runs on.

        r > 0  <=>  decay (1 + k sigmoid(-b t)) < 1  <=>  sigmoid(-b t) < a = (1/decay - 1) / k, and since
        sigmoid(-b t) falls from 1/2 as t grows, that is t > t* = ln((1 - a) / a) / b (every t > 0 when
        a >= 1/2), so the fraction is 1 - Phi((ln t* - P_mean) / P_std). 'const': n = 1, always r > 0.
        """
        decay = self.decay(stage)
        if self.mapping != "sigmoid" or self.k == 0:
            return 1.0 if decay < 1 else 0.0
        threshold = (1 / decay - 1) / self.k
        if self.b == 0:
            return 1.0 if threshold > 0.5 else 0.0
        if threshold >= 0.5:
            return 1.0
        t_star = math.log((1 - threshold) / threshold) / self.b
        return 0.5 * math.erfc((math.log(t_star) - self.P_mean) / (self.P_std * math.sqrt(2)))

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
                 noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        r = self.t_to_r(t)
        with record_masks(model):
            online = model(x0 + _per_sample(t, x0) * noise, t, labels)
        target = x0
        rows = torch.nonzero(r > 0).flatten()  # (one host sync, as locuslab/ect's `r.max() > 0`)
        if rows.numel():
            # EDM2's networks must not renormalise their weights in place in the target pass (methods.md)
            with torch.no_grad(), replay_masks(model, rows), no_forced_weight_norm(model):
                x0_rows, r_rows = x0[rows], r[rows]
                target_rows = model(x0_rows + _per_sample(r_rows, x0_rows) * noise[rows], r_rows,
                                    None if labels is None else labels[rows])
            target = x0.index_put((rows,), torch.nan_to_num(target_rows).to(x0.dtype))
        clear_masks(model)
        return self.distance(_sum_per_sample((online - target) ** 2)) * self.weight(t, r)


class AdaptiveWeight(nn.Module):
    """sCM's learned log-variance w_phi(t): one linear layer on features of the EDM noise label.

        c(t) = ln(sd tan t) / 4   (= ln(sigma) / 4, the label an EDM network embeds)
        w_phi(t) = a c(t) + b . PE(c(t)) + b0,   PE = the positional embedding of c(t)

    The optimum of the loss is w = ln E||residual||^2 - ln(sd tan t) + const, so the head must track
    -ln(sd tan t) over t in [t_min, t_max] (about -6.2 to 4.4 nats). With c(t) itself a feature it
    represents that exactly; PE(c(t)) (as FastGen's head on the network's noise embedding of
    ln(sigma)/4) adds smooth corrections. (A head on a positional embedding of t itself cannot: those
    features have numerical rank about 8 on [0.004, 1.57] and misfit the smallest t by over a nat.)
    """

    def __init__(self, channels: int = 128, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.embedding = PositionalEmbedding(channels)
        self.linear = nn.Linear(channels + 1, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        label = (self.sigma_data * t.reshape(-1).tan()).log() / 4
        embedding = self.embedding(label)
        return torch.cat([label.to(embedding.dtype)[:, None], embedding], dim=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.features(t)
        # fp32 even under autocast: bf16 keeps 3 significant digits, a 0.03-nat error at |w| = 6.
        with torch.autocast(device_type="cuda" if features.is_cuda else "cpu", enabled=False):
            weight, bias = self.linear.weight.to(features.dtype), self.linear.bias.to(features.dtype)
            return F.linear(features, weight, bias).reshape(-1)


TANGENT_NORMS = ("l2", "rms", "fastgen_rms")
# How the JVP goes through conv/linear layers: only the input tangent (2 products per layer), or
# PyTorch's built-in rule (3 products: it also convolves a materialised zero weight tangent), kept
# so that benchmarks can show the difference within one run.
JVP_RULES = ("lean", "torch")


@dataclass
class SCMTerms:
    """The pieces of one sCM loss evaluation (per-sample tensors), for the loss and for inspection."""

    t: torch.Tensor
    F_theta: torch.Tensor  # the graded forward (under autocast if enabled)
    F_minus: torch.Tensor  # the fp32 forward of the JVP, no graph
    g: torch.Tensor  # the normalised tangent target
    residual: torch.Tensor  # F_theta - sg[F_theta] - g: equal to -g in value, with F_theta's gradient
    log_var: torch.Tensor


@dataclass(eq=False)
class SCMLoss:
    """Simplified continuous-time consistency loss, sCT or sCD (Lu & Song 2024).

        tau ~ N(P_mean, P_std^2),  t = arctan(exp(tau) / sd),  z ~ N(0, sd^2 I),  x_t = cos t x0 + sin t z
        dx_t/dt = cos t z - sin t x0                       (sCT: from the data pair)
                = sd F_teacher(x_t / sd, t)                (sCD: the teacher's PF-ODE)
        sd cos t sin t dF-/dt = JVP of F- at (x_t/sd, t) along (cos t sin t dx_t/dt, sd cos t sin t)
        g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt),   g <- g / (N(g) + c)
        L = exp(-w(t)) / D^k * || F - sg[F] - g ||^2 / (sd tan t) + w(t)

    F- is the current network under stop-gradient (not an EMA), r = min(1, iteration / warmup)
    is the tangent warm-up, w(t) is the learned log-variance (:class:`AdaptiveWeight`), and
    1 / (sd tan t) is the prior weight. The JVP runs in fp32 under no_grad, by default with only the
    input tangents through conv and linear layers (``jvp_rule``, see :mod:`cmscale.models.jvp`).
    The residual is F - sg[F] - g (as FastGen), so it is exactly -g in value whatever precision F
    runs in; F - F- would leave a spurious bf16-vs-fp32 difference.

    Tangent normalisation N(g), k (D = dimension of x):
        'l2':          N = ||g||,         k = 1  (FastGen with g_norm_spatial_invariance and
                                                  divide_x_0_spatial_dim off)
        'rms':         N = ||g|| / sqrt D, k = 1
        'fastgen_rms': N = ||g|| / sqrt D, k = 2  (FastGen's default). Its loss value equals 'l2' with
                       c replaced by c sqrt(D); its gradient in F is that of 'l2' times 1 / sqrt(D).
    """

    mode: str = "sct"
    P_mean: float = -1.0
    P_std: float = 1.4
    sigma_data: float = 0.5
    warmup_iters: int = 10_000
    tangent_norm_c: float = 0.1
    tangent_norm: str = "l2"
    sigma_max: float = 80.0
    sigma_min: float = 0.002
    weight_channels: int = 128
    jvp_rule: str = "lean"
    # Derived: the time range, the learned weight (trained alongside the network) and the warm-up factor r.
    t_min: float = field(init=False)
    t_max: float = field(init=False)
    adaptive_weight: AdaptiveWeight = field(init=False)
    warmup: float = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("sct", "scd"):
            raise ValueError(f"mode must be 'sct' or 'scd', got {self.mode!r}")
        if self.tangent_norm not in TANGENT_NORMS:
            raise ValueError(f"tangent_norm must be one of {TANGENT_NORMS}, got {self.tangent_norm!r}")
        if self.jvp_rule not in JVP_RULES:
            raise ValueError(f"jvp_rule must be one of {JVP_RULES}, got {self.jvp_rule!r}")
        self.t_min = math.atan(self.sigma_min / self.sigma_data)
        self.t_max = math.atan(self.sigma_max / self.sigma_data)
        self.adaptive_weight = AdaptiveWeight(self.weight_channels, self.sigma_data)
        self.warmup = 1.0 if self.warmup_iters == 0 else 0.0

    def set_iteration(self, iteration: int) -> None:
        self.warmup = 1.0 if self.warmup_iters == 0 else min(1.0, iteration / self.warmup_iters)

    def sample_t(self, batch: int, device: torch.device) -> torch.Tensor:
        tau = torch.randn(batch, device=device) * self.P_std + self.P_mean
        return torch.atan(tau.exp() / self.sigma_data).clamp(self.t_min, self.t_max)

    def tangent(self, model, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F-, sd cos t sin t dF-/dt) by forward-mode AD, in fp32 (or fp64 if given) and without a graph.

        d/dt F(x_t/sd, t) = J_x (dx_t/dt / sd) + J_t; scaling both tangents by sd cos t sin t keeps
        them O(1) near t = pi/2 (where dx_t/dt is large) and returns the product g needs.
        """
        sd = self.sigma_data
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        cos_t, sin_t = _per_sample(t.cos(), x_t), _per_sample(t.sin(), x_t)
        x_tangent, t_tangent = (cos_t * sin_t * dxt_dt).to(dtype), (sd * t.cos() * t.sin()).to(dtype)
        x_scaled, t = x_t.to(dtype) / sd, t.to(dtype)
        # the online pass has renormalised EDM2's weights already; the tangent pass must not again
        with torch.no_grad(), torch.autocast(device_type="cuda" if x_t.is_cuda else "cpu", enabled=False), \
                no_forced_weight_norm(model):
            if self.jvp_rule == "torch":
                return torch.func.jvp(lambda x, time: model.F(x, time, labels), (x_scaled, t), (x_tangent, t_tangent))
            # The dual-number API has less per-op overhead than torch.func.jvp (no functorch levels).
            with lean_jvp(), forward_ad.dual_level():
                out = forward_ad.unpack_dual(model.F(forward_ad.make_dual(x_scaled, x_tangent),
                                                     forward_ad.make_dual(t, t_tangent), labels))
            return out.primal, out.tangent

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        norm = _sum_per_sample(g**2).sqrt()
        if self.tangent_norm in ("rms", "fastgen_rms"):
            norm = norm / math.sqrt(g[0].numel())
        return g / (_per_sample(norm, g) + self.tangent_norm_c)

    def dimension_divisor(self, dimension: int) -> int:
        """D^k of the loss: FastGen's default divides the squared residual by D twice."""
        return dimension**2 if self.tangent_norm == "fastgen_rms" else dimension

    def effective_l2_c(self, dimension: int) -> float:
        """The c of the 'l2' form whose loss value this normalisation equals (c sqrt(D) for the RMS forms)."""
        return self.tangent_norm_c * (1.0 if self.tangent_norm == "l2" else math.sqrt(dimension))

    def terms(self, model: TrigFlowPrecond | EDMAsTrigFlow, x0: torch.Tensor, teacher: EDMAsTrigFlow | None = None,
              t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> SCMTerms:
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
                dxt_dt = sd * teacher.F(x_t / sd, t, labels)
        with same_random_state(x0.device):
            F_theta = model.F(x_t / sd, t, labels)
        F_minus, scaled_dF_dt = self.tangent(model, x_t, t, dxt_dt, labels)
        g = -cos_t**2 * (sd * F_minus - dxt_dt) - self.warmup * (cos_t * sin_t * x_t + scaled_dF_dt)
        g = self.normalize(g)
        residual = F_theta - F_theta.detach() - g
        return SCMTerms(t, F_theta, F_minus, g, residual, self.adaptive_weight(t))

    def __call__(self, model: TrigFlowPrecond | EDMAsTrigFlow, x0: torch.Tensor, teacher: EDMAsTrigFlow | None = None,
                 t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        terms = self.terms(model, x0, teacher, t, noise, labels)
        squared = _sum_per_sample(terms.residual**2) / self.dimension_divisor(x0[0].numel())
        return squared / (self.sigma_data * terms.t.tan()) * torch.exp(-terms.log_var) + terms.log_var
