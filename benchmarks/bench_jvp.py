"""sCM's JVP cost: wall-clock against a forward, counted FLOPs, and sCT/sCD step times, both JVP rules in one run.

The JVP rule is how forward-mode AD goes through conv and linear layers: ``torch`` is PyTorch's
built-in rule (it also convolves a materialised all-zero weight tangent: three products per layer,
the code before issue 14), ``lean`` is cmscale's (:mod:`cmscale.models.jvp`: two products).
On a shared machine absolute times drift, so every figure is timed in interleaved rounds within this
one process (forward, JVP torch, JVP lean, ...) and the fastest of the rounds is kept.

Per preset it reports, for the network of sCT/sCD (an EDM UNet in TrigFlow form, fp32, no_grad):
    forward and JVP seconds (wall, and this thread's CPU time) and JVP / forward for each rule;
    counted FLOPs (FlopCounterMode over the ops that really run, 2 per multiply-add) of a forward
    and of each JVP, and of one training step per method (edm, ect, sct, scd) with each rule;
    training-step times (loss, backward, Adam) of ect, and of sct and scd with each rule.

    python benchmarks/bench_jvp.py                      # preset s, batch 32 at 16x16
    python benchmarks/bench_jvp.py --presets xxs,s --rounds 7
    python benchmarks/bench_jvp.py --quick              # xxs, 3 rounds, no step timing

Writes benchmarks/results/jvp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from cmscale.accounting import count_ect_step_parts
from cmscale.config import RunConfig
from cmscale.methods import RECIPES, Method, build_method
from cmscale.models.flops import count_flops
from cmscale.models.losses import JVP_RULES, ECTLoss, SCMLoss
from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond
from cmscale.models.presets import build_unet
from cmscale.models.unet import count_parameters

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
METHODS = ("edm", "ect", "sct", "scd")


def scm_loss(method: str, rule: str) -> SCMLoss:
    loss = SCMLoss(method, warmup_iters=0, jvp_rule=rule)
    loss.set_iteration(10**9)
    return loss


def step_flops(method: str, preset: str, batch: int, resolution: int, rule: str) -> int:
    """Counted FLOPs of one training step (loss and backward) on the meta device, with ``rule`` for sCM.

    ECT's target pass runs only on the rows with r > 0 (a draw-dependent count the meta device cannot
    take), so its step is counted at its most expensive: the target over the whole batch.
    """
    if method == "ect":
        online, target = count_ect_step_parts(RunConfig(method="ect", preset=preset, batch_size=batch,
                                                        resolution=resolution, budget_iters=1, teacher_ckpt="unused"))
        return online + target
    config = RunConfig(method=method, preset=preset, batch_size=batch, resolution=resolution, budget_iters=1,
                       teacher_ckpt="unused" if method in ("ect", "scd") else None)
    with torch.device("meta"):
        built = build_method(config, img_channels=1, device="meta", load_weights=False)
        if method in ("sct", "scd"):
            built = Method(RECIPES[method], built.model, scm_loss(method, rule), built.teacher)
        x0 = torch.zeros(batch, 1, resolution, resolution)
    return count_flops(lambda: built.loss(x0).mean().backward())


def random_trigflow_model(preset: str, resolution: int, seed: int) -> EDMAsTrigFlow:
    torch.manual_seed(seed)
    net = build_unet(preset, resolution, 1)
    with torch.no_grad():  # non-zero everywhere (the UNet zero-initialises its output layers)
        for parameter in net.parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 1 / parameter[0].numel() ** 0.5)
    return EDMAsTrigFlow(EDMPrecond(net))


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds): on a shared machine the CPU time is the steadier one."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - start, time.thread_time() - start_cpu


def jvp_figures(preset: str, batch: int, resolution: int, rounds: int) -> dict:
    model = random_trigflow_model(preset, resolution, seed=0)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(batch, 1, resolution, resolution, generator=generator) * 2 - 1
    z = 0.5 * torch.randn(batch, 1, resolution, resolution, generator=generator)
    t = torch.rand(batch, generator=generator) * 1.5 + 0.02
    cos_t, sin_t = t.cos().view(-1, 1, 1, 1), t.sin().view(-1, 1, 1, 1)
    x_t, dxt_dt = cos_t * x0 + sin_t * z, cos_t * z - sin_t * x0
    losses = {rule: scm_loss("sct", rule) for rule in JVP_RULES}

    def forward() -> None:
        with torch.no_grad():
            model.F(x_t / 0.5, t)

    calls = {"forward": forward, **{f"jvp_{rule}": (lambda loss=loss: loss.tangent(model, x_t, t, dxt_dt))
                                    for rule, loss in losses.items()}}
    outputs = {rule: loss.tangent(model, x_t, t, dxt_dt) for rule, loss in losses.items()}
    agreement = float((outputs["lean"][1] - outputs["torch"][1]).abs().max()
                      / outputs["torch"][1].abs().max())
    for fn in calls.values():  # warm-up
        fn()
    best = {name: float("inf") for name in calls}
    best_cpu = dict(best)
    round_ratios = {rule: [] for rule in JVP_RULES}  # JVP / forward within each round: drifts cancel
    for _ in range(rounds):
        walls = {}
        for name, fn in calls.items():
            walls[name], cpu = timed(fn)
            best[name], best_cpu[name] = min(best[name], walls[name]), min(best_cpu[name], cpu)
        for rule in JVP_RULES:
            round_ratios[rule].append(walls[f"jvp_{rule}"] / walls["forward"])
    flops = {name: count_flops(fn) for name, fn in calls.items()}
    return {
        "seconds": best, "cpu_seconds": best_cpu, "flops": flops,
        "jvp_over_forward_time": {rule: best[f"jvp_{rule}"] / best["forward"] for rule in JVP_RULES},
        "jvp_over_forward_time_median_round": {rule: statistics.median(ratios)
                                               for rule, ratios in round_ratios.items()},
        "jvp_over_forward_cpu_time": {rule: best_cpu[f"jvp_{rule}"] / best_cpu["forward"] for rule in JVP_RULES},
        "jvp_over_forward_flops": {rule: flops[f"jvp_{rule}"] / flops["forward"] for rule in JVP_RULES},
        "tangent_max_relative_difference": agreement,
    }


def step_times(preset: str, batch: int, resolution: int, rounds: int) -> dict:
    """Fastest optimiser-step time of ect, and of sct and scd with each JVP rule, interleaved."""
    generator = torch.Generator().manual_seed(2)
    x0 = torch.rand(batch, 1, resolution, resolution, generator=generator) * 2 - 1
    teacher = random_trigflow_model(preset, resolution, seed=1).eval().requires_grad_(False)

    ect_model = random_trigflow_model(preset, resolution, seed=3).edm
    variants: dict[str, Method] = {"ect": Method(RECIPES["ect"], ect_model, ECTLoss())}
    for method in ("sct", "scd"):
        for rule in JVP_RULES:
            loss = scm_loss(method, rule)
            model = random_trigflow_model(preset, resolution, seed=3)
            variants[f"{method}_{rule}"] = Method(RECIPES[method], model, loss, teacher if method == "scd" else None,
                                                  [loss.adaptive_weight])
    optimizers = {name: torch.optim.Adam(built.trainable_parameters(), lr=1e-5) for name, built in variants.items()}

    def step(name: str) -> None:
        loss = variants[name].loss(x0).mean()
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in variants:
        step(name)
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name in variants:
            best[name] = min(best[name], timed(lambda name=name: step(name))[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="s", help="comma-separated presets (default: s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the fastest is kept")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--no-steps", action="store_true", help="skip the training-step timings")
    parser.add_argument("--quick", action="store_true", help="xxs, 3 rounds, no step timing (used by run_all --quick)")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.quick, args.rounds, args.batch_size, args.resolution = True, 1, 4, 8
    if args.quick:
        args.presets, args.rounds, args.no_steps = "xxs", min(args.rounds, 3), True
    if os.environ.get("CMSCALE_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["CMSCALE_NUM_THREADS"]))
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    print(f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, fp32, "
          f"batch {args.batch_size} at {args.resolution}px, fastest of {args.rounds} interleaved rounds")

    rows = []
    for preset in presets:
        figures = jvp_figures(preset, args.batch_size, args.resolution, args.rounds)
        flops_per_step = {rule: {method: step_flops(method, preset, args.batch_size, args.resolution, rule)
                                 for method in METHODS} for rule in JVP_RULES}
        steps = None if args.no_steps else step_times(preset, args.batch_size, args.resolution, args.rounds)
        row = {"preset": preset, "params": count_parameters(build_unet(preset, args.resolution, 1)), **figures,
               "flops_per_step": flops_per_step,
               "scd_over_ect_flops": {rule: per["scd"] / per["ect"] for rule, per in flops_per_step.items()},
               "sct_over_edm_flops": {rule: per["sct"] / per["edm"] for rule, per in flops_per_step.items()},
               "step_seconds": steps}
        rows.append(row)

        print(f"\npreset {preset} ({row['params']:,} parameters); tangents agree to "
              f"{figures['tangent_max_relative_difference']:.1e} (max relative)")
        print(f"  {'':<18}{'wall s':>9}{'x fwd':>7}{'CPU s':>9}{'x fwd':>7}{'GFLOP':>9}{'x fwd':>7}")
        print(f"  {'forward':<18}{figures['seconds']['forward']:>9.4f}{1:>7.2f}"
              f"{figures['cpu_seconds']['forward']:>9.4f}{1:>7.2f}{figures['flops']['forward'] / 1e9:>9.3f}{1:>7.2f}")
        for rule in JVP_RULES:
            print(f"  {'JVP, rule ' + rule:<18}{figures['seconds'][f'jvp_{rule}']:>9.4f}"
                  f"{figures['jvp_over_forward_time'][rule]:>7.2f}{figures['cpu_seconds'][f'jvp_{rule}']:>9.4f}"
                  f"{figures['jvp_over_forward_cpu_time'][rule]:>7.2f}{figures['flops'][f'jvp_{rule}'] / 1e9:>9.3f}"
                  f"{figures['jvp_over_forward_flops'][rule]:>7.2f}")
        print("  JVP / forward, median over rounds of the within-round ratio: "
              + ", ".join(f"rule {rule} {figures['jvp_over_forward_time_median_round'][rule]:.2f}"
                          for rule in JVP_RULES))
        print(f"  counted GFLOP per training step ({'  '.join(METHODS)}), and sCD/ECT:")
        for rule in JVP_RULES:
            per = flops_per_step[rule]
            print(f"    rule {rule:<14}" + "".join(f"{per[m] / 1e9:>8.2f}" for m in METHODS)
                  + f"   sCD/ECT {row['scd_over_ect_flops'][rule]:.3f}")
        if steps:
            print("  training step (loss, backward, Adam), fastest, seconds:")
            print(f"    ect {steps['ect']:.3f}")
            for method in ("sct", "scd"):
                before, after = steps[f"{method}_torch"], steps[f"{method}_lean"]
                print(f"    {method} rule torch {before:.3f}, rule lean {after:.3f} "
                      f"(x{after / before:.2f}); {method}/ECT {before / steps['ect']:.2f} -> "
                      f"{after / steps['ect']:.2f}")

    head = rows[0]
    result = {
        "benchmark": "jvp",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": "fp32",
        "flop_convention": "2 FLOPs per multiply-add (FlopCounterMode over the ops that run)",
        "rounds": args.rounds, "batch_size": args.batch_size, "resolution": args.resolution, "rows": rows,
        "summary": {
            "preset": head["preset"],
            **{f"jvp_over_forward_{rule}": round(head["jvp_over_forward_time"][rule], 2) for rule in JVP_RULES},
            **{f"jvp_over_forward_median_round_{rule}": round(head["jvp_over_forward_time_median_round"][rule], 2)
               for rule in JVP_RULES},
            **{f"jvp_over_forward_cpu_{rule}": round(head["jvp_over_forward_cpu_time"][rule], 2) for rule in JVP_RULES},
            **{f"scd_over_ect_flops_{rule}": round(head["scd_over_ect_flops"][rule], 3) for rule in JVP_RULES},
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "jvp.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'jvp.json'}")


if __name__ == "__main__":
    main()
