"""The trainer's whole step: ``Trainer.train_step`` as a run calls it, on the demo's settings.

Beyond the optimiser step it includes what a run needs: the step's batch and draws seeded from
(seed, step) so a resumed run repeats them, the lr schedule, fused Adam and the power EMA. At the
demo's small sizes a step takes tens of milliseconds, so a few milliseconds of bookkeeping per
step show up in the demo's wall time; compare two commits by running this on each, one after the
other. Settings: 8x8 digits, batch 64, power EMA sigma_rel 0.1, a randomly initialised teacher.
Reports the fastest step (the least disturbed on a shared machine) and the median.

Whole steps vary by 20-40% from run to run on a shared machine, more than the bookkeeping costs,
so the step's bookkeeping is also timed on its own, over many calls: seeding the step's
generator (``seed_generator`` against ``torch.manual_seed``, which also seeds every accelerator
backend of a CUDA build) and the EMA update (against gathering its parameter and buffer lists
anew, as it did every step before they were kept).

    python benchmarks/bench_trainer.py                    # t6 and t16, ECT and sCD
    python benchmarks/bench_trainer.py --presets t6 --methods ect --steps 100

Writes benchmarks/results/trainer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import random_teacher  # noqa: E402

from cmscale.config import RunConfig  # noqa: E402
from cmscale.train import Trainer, seed_generator  # noqa: E402

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def time_trainer_steps(config: RunConfig, run_dir: Path, steps: int, warmup: int) -> tuple[float, float]:
    """(fastest, median) seconds per ``Trainer.train_step`` after ``warmup`` steps."""
    trainer = Trainer(config, run_dir)
    for _ in range(warmup):
        trainer.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def per_call_us(call, repeats: int) -> float:
    """Fastest of 5 rounds of ``repeats`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        best = min(best, time.perf_counter() - start)
    return best / repeats * 1e6


def bookkeeping_us(config: RunConfig, run_dir: Path) -> dict[str, float]:
    """Microseconds per call of the per-step bookkeeping pieces (see the module docstring)."""
    trainer = Trainer(config, run_dir)
    model, emas = trainer.method.model, trainer.ema.averages

    def gather_lists() -> None:
        [param.detach() for param in model.parameters()]
        for ema in emas:
            list(ema.parameters())
            list(zip(ema.buffers(), model.buffers()))

    cpu = torch.device("cpu")
    return {
        "torch.manual_seed": per_call_us(lambda: torch.manual_seed(1234), 500),
        "seed_generator": per_call_us(lambda: seed_generator(1234, cpu), 500),
        "update_emas": per_call_us(lambda: trainer.ema.update(1), 200),
        "gathering the EMA lists (per step before)": per_call_us(gather_lists, 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="t6,t16")
    parser.add_argument("--methods", default="ect,scd")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="t6 only, 20 steps (used by run_all --quick)")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.steps, args.warmup = "t6", 2, 1
    if args.quick:
        args.presets, args.steps = "t6", min(args.steps, 20)
    if os.environ.get("CMSCALE_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["CMSCALE_NUM_THREADS"]))
    print(f"CPU, {torch.get_num_threads()} threads, batch 64 at 8x8, power EMA sigma_rel 0.1")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for preset in args.presets.split(","):
            teacher = random_teacher(preset, 8, Path(folder))
            for method in args.methods.split(","):
                config = RunConfig(
                    method=method, preset=preset, dataset="digits", resolution=8, batch_size=64, lr=1e-3,
                    budget_iters=args.steps + args.warmup + 1, ema_rates=[], ema_sigma_rels=[0.1],
                    device="cpu", teacher_ckpt=teacher, sweep="bench", run_id=f"{method}-{preset}",
                )
                fastest, median = time_trainer_steps(config, Path(folder) / f"{method}-{preset}", args.steps,
                                                     args.warmup)
                rows.append({"preset": preset, "method": method, "ms_per_step": fastest * 1e3,
                             "ms_per_step_median": median * 1e3})
                print(f"  {preset:>4} {method:>4}: {fastest * 1e3:6.1f} ms/step", flush=True)
        bookkeeping = bookkeeping_us(config, Path(folder) / "bookkeeping")
    print()
    header = f"{'preset':>6} {'method':>6} {'fastest ms':>11} {'median ms':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['preset']:>6} {row['method']:>6} {row['ms_per_step']:>11.1f} {row['ms_per_step_median']:>10.1f}")
    print(f"\nper-step bookkeeping ({config.preset} {config.method}), microseconds per call:")
    for name, value in bookkeeping.items():
        print(f"  {name:<42} {value:>9.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "trainer",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "rows": rows,
        "bookkeeping_us": bookkeeping,
        "summary": {f"{r['preset']} {r['method']} ms/step": round(r["ms_per_step"], 2) for r in rows},
    }
    (RESULTS / "trainer.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'trainer.json'}")


if __name__ == "__main__":
    main()
