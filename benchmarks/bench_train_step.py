"""Training-step throughput per method and preset: images/s, counted FLOPs per step, GFLOP/s, MFU.

For each preset and method (edm, ect, sct, scd) it times full optimiser steps (loss, backward,
Adam, EMA) on random 16x16 digit-shaped batches, with a randomly initialised teacher where the
method needs one. FLOPs per step are the counted ones the trainer uses (FlopCounterMode, 2 per
multiply-add; ECT's target forward, sCM's JVP and sCD's teacher forward included), so achieved
GFLOP/s = FLOPs per step / seconds per step. MFU divides that by a measured matmul peak on the same
device (fp32 on CPU; bf16 under autocast on CUDA, where the steps also run in bf16 autocast).
The sCD/ECT step-time ratio is the wall-clock price of sCD's JVP and teacher over ECT's target pass.

    python benchmarks/bench_train_step.py                       # xxs, xs, s
    python benchmarks/bench_train_step.py --presets xxs --steps 3 --quick

Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from cmscale.accounting import flops_per_step
from cmscale.config import RunConfig
from cmscale.methods import build_method
from cmscale.models.presets import build_unet
from cmscale.models.unet import count_parameters

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
METHODS = ("edm", "ect", "sct", "scd")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best-of-``repeats`` GFLOP/s of a square matmul: the reference for MFU on this device."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def time_steps(config: RunConfig, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(fastest, median) seconds per optimiser step (loss, backward, Adam, EMA), after ``warmup`` steps.

    The fastest step is the least disturbed by other processes on a shared machine; rates use it.
    """
    torch.manual_seed(0)
    method = build_method(config, img_channels=1, device=device)
    method.set_iteration(10**9)  # full tangent warm-up, as in most of an sCM run
    params = method.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=1e-4)
    ema = [p.detach().clone() for p in method.model.parameters()]
    x0 = torch.rand(config.batch_size, 1, config.resolution, config.resolution, device=device) * 2 - 1
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    def step() -> None:
        with autocast:
            loss = method.loss(x0).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for averaged, live in zip(ema, method.model.parameters()):
                averaged.lerp_(live, 0.001)

    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def random_teacher(preset: str, resolution: int, folder: Path) -> str:
    path = folder / f"teacher_{preset}_{resolution}.pt"
    if not path.exists():
        torch.save({"net": build_unet(preset, resolution, 1).state_dict()}, path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="xxs,xs,s", help="comma-separated presets (default: xxs,xs,s)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per (method, preset); rates use the fastest")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="xxs and xs only, 3 steps (used by run_all --quick)")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.steps, args.warmup, args.batch_size, args.resolution = "xxs", 1, 0, 4, 8
    if args.quick:
        args.presets, args.steps = "xxs,xs", min(args.steps, 3)
    if os.environ.get("CMSCALE_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["CMSCALE_NUM_THREADS"]))

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    precision = "bf16" if device.type == "cuda" else "fp32"
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_gflops(
        device, peak_dtype, size=8192 if device.type == "cuda" else 1024, repeats=20 if device.type == "cuda" else 5
    )
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    )
    print(
        f"device {device} ({device_name}), {torch.get_num_threads()} threads, precision {precision}, "
        f"batch {args.batch_size} at {args.resolution}px; matmul peak {peak:.1f} GFLOP/s ({peak_dtype})"
    )

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for preset in presets:
            teacher = random_teacher(preset, args.resolution, Path(folder))
            for method in methods:
                config = RunConfig(
                    method=method,
                    preset=preset,
                    batch_size=args.batch_size,
                    resolution=args.resolution,
                    budget_iters=1,
                    precision=precision,
                    device=str(device),
                    teacher_ckpt=teacher if method in ("ect", "scd") else None,
                )
                flops = flops_per_step(config)
                seconds, median = time_steps(config, device, args.steps, args.warmup)
                achieved = flops / seconds / 1e9
                rows.append(
                    {
                        "preset": preset,
                        "method": method,
                        "params": count_parameters(build_unet(preset, args.resolution, 1)),
                        "batch_size": args.batch_size,
                        "s_per_step": seconds,
                        "s_per_step_median": median,
                        "images_per_s": args.batch_size / seconds,
                        "flops_per_step": flops,
                        "achieved_gflops": achieved,
                        "mfu": achieved / peak,
                    }
                )
                row = rows[-1]
                print(
                    f"  {preset:>4} {method:>4}: {row['s_per_step'] * 1e3:8.1f} ms/step {row['images_per_s']:9.1f} "
                    "img/s "
                    f"{flops / 1e9:9.2f} GFLOP/step {achieved:8.2f} GFLOP/s  MFU {row['mfu']:.1%}",
                    flush=True,
                )

    ratios = {}
    for preset in presets:
        by_method = {row["method"]: row for row in rows if row["preset"] == preset}
        if "scd" in by_method and "ect" in by_method:
            ratios[preset] = {
                "scd_over_ect_time": by_method["scd"]["s_per_step"] / by_method["ect"]["s_per_step"],
                "scd_over_ect_flops": by_method["scd"]["flops_per_step"] / by_method["ect"]["flops_per_step"],
            }

    print()
    header = f"{'preset':>6} {'method':>6} {'params':>10} {'img/s':>9} {'GFLOP/step':>11} {'GFLOP/s':>9} {'MFU':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['preset']:>6} {row['method']:>6} {row['params']:>10,} {row['images_per_s']:>9.1f} "
            f"{row['flops_per_step'] / 1e9:>11.2f} {row['achieved_gflops']:>9.2f} {row['mfu']:>7.1%}"
        )
    for preset, ratio in ratios.items():
        print(
            f"sCD/ECT on {preset}: step time x{ratio['scd_over_ect_time']:.2f}, counted FLOPs "
            f"x{ratio['scd_over_ect_flops']:.2f}"
        )

    result = {
        "benchmark": "train_step",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": precision,
        "matmul_peak_gflops": peak,
        "matmul_peak_dtype": str(peak_dtype),
        "flop_convention": "2 FLOPs per multiply-add (FlopCounterMode)",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "rows": rows,
        "scd_over_ect": ratios,
        "summary": {
            "device": str(device),
            **{
                f"img_per_s_{row['method']}_{row['preset']}": round(row["images_per_s"], 1)
                for row in rows
                if row["preset"] == presets[0]
            },
            **{f"scd_over_ect_time_{preset}": round(ratio["scd_over_ect_time"], 2) for preset, ratio in ratios.items()},
            "max_mfu": max(row["mfu"] for row in rows),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'train_step.json'}")


if __name__ == "__main__":
    main()
