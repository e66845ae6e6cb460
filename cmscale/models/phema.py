"""Post-hoc EMA (Karras et al. 2024, EDM2, section 3.2 and appendix C): any EMA width after training,
reconstructed from snapshots of two power-function EMAs stored at a fixed interval.

A power-function EMA with exponent gamma, read at step t, averages the trained weights theta_tau
(tau in (0, t]) with the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),

(cmscale's trainer updates it with beta_t = (1 - 1/t)^(gamma+1), whose weight on step tau is this
profile's integral over (tau - 1, tau]; see :mod:`cmscale.models.ema`). Every snapshot i is such
an average, so a combination sum_i x_i snapshot_i averages with the profile sum_i x_i p_i. The
coefficients that bring that profile closest (in L2 over tau) to the wanted p_r = p_{t_r,gamma_r}
solve the normal equations A x = b of the least-squares problem, with the closed-form inner products

    <p_a, p_b> = (gamma_a + 1)(gamma_b + 1) m^(gamma_a + gamma_b + 1)
                 / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1) t_b^(gamma_b + 1)),   m = min(t_a, t_b),

A_ij = <p_i, p_j>, b_i = <p_i, p_r>. The reconstruction is sum_i x_i snapshot_i, accumulated one
snapshot at a time (the snapshots need not fit in memory together).

On disk a run keeps its snapshots as ``phema/phema-<step>-<sigma_rel>.pt``, each a dict with the
network's state dict under ``net``, ``step`` and ``sigma_rel``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmscale.models.ema import power_ema_gamma

PHEMA_DIR = "phema"
_SNAPSHOT = re.compile(r"^phema-(\d+)-(\d+\.\d+)\.pt$")


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> for every pair (rows a, columns b) of power-function EMA profiles (float64)."""
    t_a, gamma_a = (np.asarray(v, dtype=np.float64)[:, None] for v in (t_a, gamma_a))
    t_b, gamma_b = (np.asarray(v, dtype=np.float64)[None, :] for v in (t_b, gamma_b))
    shared = np.minimum(t_a, t_b)
    power = gamma_a + gamma_b + 1
    # in logs: t^(gamma+1) overflows float64 for long runs and small widths
    log_value = (np.log(gamma_a + 1) + np.log(gamma_b + 1) + power * np.log(shared) - np.log(power)
                 - (gamma_a + 1) * np.log(t_a) - (gamma_b + 1) * np.log(t_b))
    return np.exp(log_value)


def solve_coefficients(in_steps: Sequence[int], in_sigma_rels: Sequence[float], out_step: int,
                       out_sigma_rels: Sequence[float]) -> np.ndarray:
    """x [len(in), len(out)]: snapshot weights whose profile is closest to each wanted (out_step, sigma_rel)."""
    if len(in_steps) != len(in_sigma_rels) or not len(in_steps):
        raise ValueError("post-hoc EMA needs at least one snapshot, each with a step and a sigma_rel")
    if min(in_steps) < 1 or out_step < 1:
        raise ValueError("post-hoc EMA steps count from 1")
    in_gamma = np.array([power_ema_gamma(s) for s in in_sigma_rels])
    out_gamma = np.array([power_ema_gamma(s) for s in out_sigma_rels])
    gram = profile_inner_products(np.asarray(in_steps), in_gamma, np.asarray(in_steps), in_gamma)
    target = profile_inner_products(np.asarray(in_steps), in_gamma, np.full(len(out_gamma), out_step), out_gamma)
    return np.linalg.lstsq(gram, target, rcond=None)[0]


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float


def snapshot_path(run_dir: Path, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / PHEMA_DIR / f"phema-{step:08d}-{sigma_rel:.4f}.pt"


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The run's stored power-EMA snapshots, by step then width."""
    folder = Path(run_dir) / PHEMA_DIR
    found = []
    for path in sorted(folder.glob("phema-*.pt")) if folder.is_dir() else []:
        match = _SNAPSHOT.match(path.name)
        if match:
            found.append(Snapshot(path, int(match.group(1)), float(match.group(2))))
    return sorted(found, key=lambda snap: (snap.step, snap.sigma_rel))


def save_snapshot(run_dir: Path, step: int, sigma_rel: float, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write one snapshot atomically (a half-written file never has the final name)."""
    path = snapshot_path(run_dir, step, sigma_rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"net": {key: value.detach().cpu() for key, value in state_dict.items()}, "step": step,
                "sigma_rel": sigma_rel}, tmp)
    tmp.replace(path)
    return path


def reconstruct(snapshots: Sequence[Snapshot], sigma_rels: Sequence[float],
                step: int | None = None) -> tuple[int, list[dict[str, torch.Tensor]]]:
    """The power EMAs of width ``sigma_rels`` at ``step`` (default: the last snapshot's), from ``snapshots``
    up to that step: ``(step, [state dict per width])`` in float32 (integer buffers from the last snapshot)."""
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots to reconstruct from")
    step = max(snap.step for snap in snapshots) if step is None else step
    used = [snap for snap in snapshots if snap.step <= step]
    if not any(snap.step == step for snap in used):
        raise ValueError(f"no snapshot at step {step}; reconstruct at a stored step "
                         f"({', '.join(str(s) for s in sorted({snap.step for snap in snapshots}))})")
    coefficients = solve_coefficients([s.step for s in used], [s.sigma_rel for s in used], step, sigma_rels)
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    for snap, weights in zip(used, coefficients):
        state = torch.load(snap.path, map_location="cpu", weights_only=True)["net"]
        for output, weight in zip(outputs, weights):
            for key, value in state.items():
                if not value.is_floating_point():
                    output[key] = value.clone()
                    continue
                term = value.double() * float(weight)
                output[key] = term if key not in output else output[key].add_(term)
    return step, [{key: value.float() if value.is_floating_point() else value for key, value in output.items()}
                  for output in outputs]


def reconstruction_path(run_dir: Path, sigma_rel: float) -> Path:
    """Where ``cmscale ema reconstruct`` writes the checkpoint of one width."""
    return Path(run_dir) / PHEMA_DIR / f"ema-{sigma_rel:.4f}.pt"
