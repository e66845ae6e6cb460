"""Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): an average whose width is a fixed fraction of the run, whatever its length.

A fixed-rate EMA averages the last ~1/(1 - rate) steps: too long for a 20-step run (the average still
holds the initial weights) and too short for a 2,000-step one (the average follows the optimiser's
noise). An iso-FLOP sweep has both in one study. The power EMA instead decays at step t as

    beta_t = (1 - 1/t)^(gamma + 1),

so after T steps the average is  sum_t w_t theta_t  with the closed-form weights

    w_t = (t^(gamma+1) - (t-1)^(gamma+1)) / T^(gamma+1)     (they telescope to 1),

a profile close to t^gamma. Its width relative to the run's age, sigma_rel (the standard deviation of
the profile over T), fixes gamma:

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),

i.e.  gamma^3 + 7 gamma^2 + (16 - 1/sigma_rel^2) gamma + (12 - 1/sigma_rel^2) = 0,  largest real root.
EDM2 uses sigma_rel around 0.05-0.15; sigma_rel below MAX_SIGMA_REL = sqrt(1/12) (gamma = 0) is required.
"""

from __future__ import annotations

import numpy as np

MAX_SIGMA_REL = (1 / 12) ** 0.5  # gamma = 0: a uniform average over the whole run


def power_ema_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power EMA whose relative width is ``sigma_rel`` (in (0, MAX_SIGMA_REL))."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel}")
    inv = 1 / sigma_rel**2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(root.real for root in roots if abs(root.imag) < 1e-9))


def power_ema_decay(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma+1) for the ``step``-th update (1-based): 0 at the first, so the average starts
    at the first trained weights rather than the initial ones."""
    if step < 1:
        raise ValueError(f"power EMA steps count from 1, got {step}")
    return (1 - 1 / step) ** (gamma + 1)
