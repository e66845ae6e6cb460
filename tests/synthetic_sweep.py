"""A stored synthetic sweep: real run directories (written with cmscale.rundir's writers) whose evals follow
a known law, for the report, render, pipeline and fit tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cmscale.config import RunConfig
from cmscale.rundir import CONFIG_FILE, DONE_FILE, METRICS_FILE, MetricsWriter, atomic_write_json, write_status

SWEEP = "synth"
# FID = E + A N^-alpha + B D^-beta (D = images seen), times a per-method/steps factor
E, A, B, ALPHA, BETA = 2.0, 270.0, 1000.0, 0.3, 0.4
SIZES = {"xxs": 1e5, "xs": 3e5, "s": 1e6, "m": 3e6}
BUDGETS = [1e12, 4e12, 1.6e13]
BATCH = 64
FACTORS = {("ect", 1): 1.45, ("ect", 2): 1.25, ("scd", 1): 1.3, ("scd", 2): 1.09}
TEACHER_BUDGET = 6.4e13
FRACTIONS = (0.25, 0.5, 1.0)


def law(n: float, images: float) -> float:
    return E + A * n**-ALPHA + B * images**-BETA


def write_run(
    root: Path,
    method: str,
    preset: str,
    budget: float,
    seed: int,
    rng,
    status: str = "done",
    teacher: str | None = None,
) -> str:
    """One run directory as a finished trainer leaves it: config.json, metrics.jsonl, status.json, done.json."""
    n = SIZES[preset]
    flops_per_step = 6.0 * n * BATCH * (1.5 if method == "scd" else 1.0)
    iters = int(budget // flops_per_step)
    run_id = f"{method}-{preset}-{budget:.0e}-s{seed}".replace("+", "")
    run_dir = root / SWEEP / run_id
    extra = {"teacher_ckpt": f"/ckpt/{teacher}.pt", "teacher_run_id": teacher} if teacher else {}
    config = RunConfig(
        method=method,
        preset=preset,
        budget_flops=budget,
        seed=seed,
        batch_size=BATCH,
        sweep=SWEEP,
        run_id=run_id,
        **extra,
    )
    atomic_write_json(
        run_dir / CONFIG_FILE,
        config.model_dump(mode="json")
        | {
            "run_id": run_id,
            "params": int(n),
            "flops_per_step": flops_per_step,
            "flops_per_image_forward": 2.0 * n,
            "budget_iters_resolved": iters,
            "img_channels": 1,
            "world_size": 1,
            "git_commit": "synthetic",
        },
    )
    fractions = FRACTIONS if status == "done" else FRACTIONS[:1]
    with MetricsWriter(run_dir / METRICS_FILE) as writer:
        for fraction in fractions:
            step = max(1, int(iters * fraction))
            images = step * BATCH
            flops = step * flops_per_step
            writer.write(
                {
                    "kind": "train",
                    "step": step,
                    "images_seen": images,
                    "train_flops": flops,
                    "loss": 1.0 / step,
                    "wall_s": 0.1 * step,
                }
            )
            steps = [8] if method == "edm" else [1, 2]
            for k in steps:
                factor = 1.0 if method == "edm" else FACTORS[method, k]
                fid = factor * law(n, images) * math.exp(rng.normal(0.0, 0.02))
                nfe = 2 * k - 1 if method == "edm" else k
                writer.write(
                    {
                        "kind": "eval",
                        "step": step,
                        "train_flops": flops,
                        "images_seen": images,
                        "sampler_steps": k,
                        "nfe": nfe,
                        "fid": fid,
                        "num_samples": 500,
                        "extractor": "digits-cnn",
                        "reference": "digits-train",
                        "sampling_flops_per_image": nfe * 2.0 * n,
                        "wall_s": 1.0,
                    }
                )
    write_status(run_dir, status)
    atomic_write_json(
        run_dir / DONE_FILE,
        {
            "status": status,
            "reason": "loss is NaN at step 12" if status == "failed" else "",
            "final_step": step,
            "train_flops": flops,
            "wall_s": 10.0,
            "started": 1.7e9,
            "finished": 1.7e9 + 10,
        },
    )
    return run_id


def build_sweep(root: Path) -> None:
    rng = np.random.default_rng(7)
    for preset in SIZES:
        teacher = write_run(root, "edm", preset, TEACHER_BUDGET, 0, rng)
        for method in ("ect", "scd"):
            for budget in BUDGETS:
                write_run(root, method, preset, budget, 0, rng, teacher=teacher)
    write_run(root, "ect", "m", 6.4e13, 0, rng, status="failed", teacher="edm-m-6e13-s0")
