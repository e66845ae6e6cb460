"""torch.compile on this machine: compile time against the per-step speed-up, and the break-even run length.

Times full training steps (loss, backward, Adam) of one method and preset eagerly and with the
network compiled in place (``compile = true``; inductor by default), on random digit-shaped batches.
The first compiled step includes compilation; break-even = compile time / time saved per step.

    python benchmarks/bench_compile.py                          # ect, xs, batch 32, 16x16
    python benchmarks/bench_compile.py --preset s --method edm --backend inductor

Writes benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from cmscale.config import RunConfig
from cmscale.methods import build_method, network_of
from cmscale.models.execution import compile_network
from cmscale.models.presets import build_unet

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def step_times(config: RunConfig, teacher: str | None, compiled: bool, backend: str, steps: int) -> tuple[float, float]:
    """(seconds of the first step, median seconds of the next ``steps``)."""
    torch.manual_seed(0)
    method = build_method(config.model_copy(update={"teacher_ckpt": teacher}), img_channels=1)
    method.set_iteration(10**9)
    if compiled:
        compile_network(network_of(method.model), backend=backend)
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=1e-4)
    x0 = torch.rand(config.batch_size, 1, config.resolution, config.resolution) * 2 - 1

    def step() -> None:
        loss = method.loss(x0).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ect")
    parser.add_argument("--preset", default="xs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:  # the eager backend: no compiler build, so seconds on a CPU
        args.method, args.preset, args.batch_size, args.resolution, args.steps = "edm", "xxs", 4, 8, 2
        args.backend = "eager"
    if os.environ.get("CMSCALE_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["CMSCALE_NUM_THREADS"]))
    config = RunConfig(method="edm", preset=args.preset, batch_size=args.batch_size, resolution=args.resolution,
                       budget_iters=1)
    config = config.model_copy(update={"method": args.method})
    teacher = None
    if args.method in ("ect", "scd"):
        teacher = str(RESULTS / f".teacher_{args.preset}_{args.resolution}.pt")
        RESULTS.mkdir(parents=True, exist_ok=True)
        torch.save({"net": build_unet(args.preset, args.resolution, 1).state_dict()}, teacher)
    eager_first, eager = step_times(config, teacher, False, args.backend, args.steps)
    compiled_first, compiled = step_times(config, teacher, True, args.backend, args.steps)
    if teacher:
        Path(teacher).unlink()
    compile_s = compiled_first - compiled
    saved = eager - compiled
    break_even = compile_s / saved if saved > 0 else None
    row = {"method": args.method, "preset": args.preset, "batch_size": args.batch_size, "resolution": args.resolution,
           "backend": args.backend, "threads": torch.get_num_threads(), "eager_s_per_step": eager,
           "compiled_s_per_step": compiled, "speedup": eager / compiled, "compile_s": compile_s,
           "break_even_steps": break_even}
    print(f"{'method':>6} {'preset':>6} {'eager ms':>9} {'compiled ms':>12} {'speed-up':>9} {'compile s':>10} "
          f"{'break-even':>11}")
    print(f"{args.method:>6} {args.preset:>6} {eager * 1e3:>9.1f} {compiled * 1e3:>12.1f} {eager / compiled:>8.2f}x "
          f"{compile_s:>10.1f} {(f'{break_even:.0f} steps' if break_even else 'never'):>11}")
    result = {"benchmark": "compile", "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "device": "cpu", "device_name": platform.processor() or platform.machine(), "torch": torch.__version__,
              "rows": [row], "summary": {"speedup": round(row["speedup"], 2), "compile_s": round(compile_s, 1)}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compile.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'compile.json'}")


if __name__ == "__main__":
    main()
