"""GPU check: training throughput, MFU, memory, data-loading share, bf16 vs fp32, sampling and Inception speed.

Run it whenever a CUDA GPU is at hand (one prepared command; about 5 minutes on an H100/H200):

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT          # writes $OUT/gpu_check.json too
    PYTHONPATH=. python3 benchmarks/gpu_check.py --quick             # fewer steps, no compile rows

For each method (edm, ect, sct, scd) at presets ``l`` and ``xl``, 32x32x3 images, batch 128, in
bf16 autocast and in fp32 (TF32 tensor cores, as the trainer runs fp32 on CUDA), it times the
trainer's step: the real loader (:class:`cmscale.data.loader.StepBatches` on synthetic CIFAR-shaped
uint8 data), loss, backward, fused Adam, EMA update and the per-step loss read-back. It reports

- img/s and MFU = counted FLOPs per step (cmscale's FlopCounterMode count, 2 per multiply-add, ECT's
  target pass, sCM's JVP and sCD's teacher included) / step time / a bf16 matmul peak measured in
  this run (an 8192^3 matmul, best of 20);
- peak GPU memory of the step;
- the data-loading share: one synchronised loader call / one step (the trainer reads the loss back
  every step, so loading is not overlapped with compute); it must stay under 5%;
- the loss of one batch in bf16 autocast against fp32 (same weights, same draw);
- 1- and 2-step sampling throughput at ``xl`` (EDM-time and TrigFlow samplers);
- Inception feature throughput (torch-fidelity's inception-v3-compat; random weights unless
  ``--inception-weights`` is given, since only the speed is measured);
- variants of ECT at ``xl`` in bf16: channels_last, torch.compile, both (the compile time is reported;
  skipped with a note when the time budget is spent).

Networks get random non-zero weights (a fresh UNet's zero output layers would make every loss 0).
Imports only torch, numpy and cmscale modules that need nothing else (the integrator's GPU machine
has no pydantic, submitit, duckdb or click); torch-fidelity is optional. Without CUDA it prints
"no CUDA" and exits 0, unless ``--device cpu`` asks for a dry run of the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cmscale.data.datasets import ImageData
from cmscale.data.loader import StepBatches, step_seed
from cmscale.models.execution import compile_network, to_channels_last
from cmscale.models.flops import count_flops
from cmscale.models.losses import ECTLoss, EDMLoss, SCMLoss
from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond, TrigFlowPrecond
from cmscale.models.presets import build_unet
from cmscale.models.samplers import cm_sample_edm, cm_sample_trigflow, ect_times, scm_times
from cmscale.models.unet import count_parameters

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("edm", "ect", "sct", "scd")
LOADING_SHARE_LIMIT = 0.05


# ----------------------------------------------------------------------------------------------
# Timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, size: int, repeats: int) -> float:
    """Best-of-``repeats`` TFLOP/s of a square bf16 matmul: the reference for MFU."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-zero weights, scaled by fan-in (as the tests do), so outputs and losses are not 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim > 1:
                values = torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter[0].numel())
            elif "norm" in name:
                continue
            else:
                values = 0.1 * torch.randn(parameter.shape, generator=generator)
            parameter.copy_(values.to(parameter.device))
    return module


# ----------------------------------------------------------------------------------------------
# The methods, built from cmscale.models alone (cmscale.methods needs pydantic for its config)


class Setup:
    """Model, loss, teacher and trainable parameters of one method, as cmscale.methods builds them."""

    def __init__(self, method: str, preset: str, resolution: int, channels: int, device: torch.device | str):
        self.method = method

        def unet(seed: int):
            net = build_unet(preset, resolution, channels)
            return randomize(net, seed) if torch.device(device).type != "meta" else net

        self.teacher = None
        self.extra: list[torch.nn.Module] = []
        if method == "edm":
            self.model, self.loss_fn = EDMPrecond(unet(0)), EDMLoss()
        elif method == "ect":
            self.model, self.loss_fn = EDMPrecond(unet(0), sigma_min=0.002), ECTLoss()
        else:
            # warmup_iters=0: the full tangent, as in most of an sCM run (the cost does not depend on it).
            self.loss_fn = SCMLoss(method, warmup_iters=0)
            self.extra = [self.loss_fn.adaptive_weight]
            if method == "sct":
                self.model = TrigFlowPrecond(unet(0))
            else:
                self.model = EDMAsTrigFlow(EDMPrecond(unet(0)))
                self.teacher = EDMAsTrigFlow(EDMPrecond(unet(1))).requires_grad_(False).eval()
        for module in [self.model, self.teacher, *self.extra]:
            if module is not None:
                module.to(device)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        if self.method in ("sct", "scd"):
            return self.loss_fn(self.model, x0, teacher=self.teacher)
        return self.loss_fn(self.model, x0)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.model.parameters(), *(p for module in self.extra for p in module.parameters())]

    def unet(self) -> torch.nn.Module:
        return self.model.edm.net if isinstance(self.model, EDMAsTrigFlow) else self.model.net


def flops_per_step(method: str, preset: str, resolution: int, channels: int, batch: int) -> int:
    """Counted FLOPs of one training step (shapes only, on the meta device)."""
    with torch.device("meta"):
        setup = Setup(method, preset, resolution, channels, "meta")
        x0 = torch.zeros(batch, channels, resolution, resolution)
    return count_flops(lambda: setup.loss(x0).mean().backward())


def synthetic_cifar(num_images: int, resolution: int, channels: int) -> ImageData:
    generator = torch.Generator().manual_seed(0)
    shape = (num_images, channels, resolution, resolution)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return ImageData("synthetic-cifar", images, torch.zeros(num_images, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# One training configuration


def train_row(args, device: torch.device, data: ImageData, method: str, preset: str, precision: str,
              peak_tflops: float, channels_last: bool = False, compile_net: bool = False) -> dict:
    """Times the trainer's step for one (method, preset, precision); see the module docstring."""
    torch.manual_seed(0)
    setup = Setup(method, preset, args.resolution, 3, device)
    if channels_last:
        to_channels_last(setup.model, setup.teacher)
    params = setup.parameters()
    optimizer = torch.optim.Adam(params, lr=1e-5, fused=device.type == "cuda")
    ema = [p.detach().clone() for p in setup.model.parameters()]
    batches = StepBatches(data, args.batch_size, seed=0, device=device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    compile_s = None
    if compile_net:
        compile_network(setup.unet())

    def step(index: int) -> float:
        torch.manual_seed(step_seed(0, index))
        x0 = batches(index)
        with autocast:
            loss = setup.loss(x0).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())  # the trainer reads the loss back every step (non-finite check)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in setup.model.parameters()], 1e-3)
        return value

    start = time.perf_counter()
    step(0)
    synchronize(device)
    if compile_net:
        compile_s = time.perf_counter() - start
    for index in range(1, args.warmup):
        step(index)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(args.steps):
        start = time.perf_counter()
        step(args.warmup + index)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    seconds = sorted(times)[len(times) // 2]

    load_times = []
    for index in range(max(5, args.steps)):
        synchronize(device)
        start = time.perf_counter()
        batches(10_000 + index)
        synchronize(device)
        load_times.append(time.perf_counter() - start)
    load_s = sorted(load_times)[len(load_times) // 2]

    flops = flops_per_step(method, preset, args.resolution, 3, args.batch_size)
    row = {
        "method": method, "preset": preset, "precision": precision,
        "channels_last": channels_last, "compile": compile_net,
        "params": count_parameters(setup.unet()), "batch_size": args.batch_size,
        "s_per_step": seconds, "s_per_step_min": min(times), "img_per_s": args.batch_size / seconds,
        "flops_per_step": flops, "tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak_tflops,
        "peak_memory_gib": peak_memory, "load_s": load_s, "loading_share": load_s / seconds,
        "compile_s": compile_s,
    }
    if precision == "bf16" and not compile_net and not channels_last:
        row.update(bf16_vs_fp32(setup, batches, device))
    return row


def bf16_vs_fp32(setup: Setup, batches: StepBatches, device: torch.device) -> dict:
    """The loss of one batch under bf16 autocast and in fp32, from the same weights and draw."""
    x0 = batches(123)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(step_seed(0, 123))
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), autocast:
            losses[precision] = float(setup.loss(x0).mean())
    return {"loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"],
            "loss_rel_diff": abs(losses["bf16"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-30)}


# ----------------------------------------------------------------------------------------------
# Sampling and Inception


def time_call(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one untimed call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sampling_rows(args, device: torch.device, preset: str) -> list[dict]:
    """1- and 2-step consistency sampling (EDM-time for ECT, TrigFlow for sCM) in bf16 and fp32."""
    rows = []
    shape = (args.sample_batch, 3, args.resolution, args.resolution)
    net = randomize(build_unet(preset, args.resolution, 3), 0).to(device).eval()
    models = {"edm": EDMPrecond(net, sigma_min=0.002), "trigflow": TrigFlowPrecond(net)}
    for sampler, model in models.items():
        for precision in ("bf16", "fp32"):
            for steps in (1, 2):
                def draw(model=model, sampler=sampler, precision=precision, steps=steps):
                    generator = torch.Generator(device).manual_seed(0)
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        if sampler == "edm":
                            return cm_sample_edm(model, shape, ect_times(steps), generator, device)
                        return cm_sample_trigflow(model, shape, scm_times(steps), 0.5, generator, device)

                seconds = time_call(draw, device, args.sample_repeats)
                rows.append({"preset": preset, "sampler": sampler, "precision": precision, "steps": steps,
                             "batch_size": args.sample_batch, "img_per_s": args.sample_batch / seconds})
    return rows


def inception_row(args, device: torch.device) -> dict:
    """Images/s through torch-fidelity's inception-v3-compat (uint8 32x32 in, 2048-d features out)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        return {"skipped": f"torch-fidelity not importable ({error}); put its wheel on PYTHONPATH"}

    class RandomInception(FeatureExtractorInceptionV3):
        """torch-fidelity's network with its random initial weights (speed does not depend on them)."""

        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
            return None

    with tempfile.TemporaryDirectory() as folder:
        if args.inception_weights:
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                    feature_extractor_weights_path=args.inception_weights)
            weights = args.inception_weights
        else:
            empty = Path(folder) / "empty.pt"
            torch.save({}, empty)
            extractor = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
            weights = "random"
    extractor = extractor.to(device)
    shape = (args.inception_batch, 3, args.resolution, args.resolution)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    with torch.no_grad():
        features = extractor(images)[0]
        seconds = time_call(lambda: extractor(images), device, args.sample_repeats)
    return {"weights": weights, "batch_size": args.inception_batch, "feature_dim": int(features.shape[-1]),
            "img_per_s": args.inception_batch / seconds}


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for a copy of gpu_check.json (besides benchmarks/results)")
    parser.add_argument("--results-dir", default=str(RESULTS),
                        help="where gpu_check.json goes (default benchmarks/results)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of this script")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats, no compile variants")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default l,xl; a cpu dry run uses xs)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 128; cpu dry run 4)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10, quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 2)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="skip the compile variants if less than 120 s of this budget is left")
    parser.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05 weights (default: random)")
    args = parser.parse_args(argv)
    dry_run = args.device == "cpu"
    args.presets = args.presets or ("xs" if dry_run else "l,xl")
    args.batch_size = args.batch_size or (4 if dry_run else 128)
    args.steps = args.steps or (1 if dry_run else 4 if args.quick else 10)
    args.warmup = args.warmup or (1 if dry_run else 2 if args.quick else 3)
    args.sample_batch = 4 if dry_run else 512
    args.sample_repeats = 1 if dry_run else 3 if args.quick else 5
    args.inception_batch = 2 if dry_run else 256
    args.peak_size = 256 if dry_run else 8192
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA: benchmarks/gpu_check.py measures a CUDA GPU; nothing to do on this machine")
        return 0
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's default (tf32 = true) for fp32 runs
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine())
    peak = matmul_peak_tflops(device, args.peak_size, repeats=20 if device.type == "cuda" else 2)
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    print(f"{device_name}: torch {torch.__version__}, bf16 matmul peak {peak:.1f} TFLOP/s; "
          f"batch {args.batch_size} of {args.resolution}x{args.resolution}x3", flush=True)

    data = synthetic_cifar(50_000 if device.type == "cuda" else 64, args.resolution, 3)
    rows = []
    for preset in presets:
        for method in methods:
            for precision in ("bf16", "fp32"):
                rows.append(train_row(args, device, data, method, preset, precision, peak))
                free_memory(device)
                print(f"  {preset:>3} {method:>4} {precision}: {rows[-1]['img_per_s']:8.1f} img/s, "
                      f"MFU {rows[-1]['mfu']:6.1%}", flush=True)

    variants = []
    largest = presets[-1]
    if "ect" in methods:
        wanted = [(True, False)]  # (channels_last, compile)
        if not args.quick and device.type == "cuda":
            wanted += [(False, True), (True, True)]
        for channels_last, compile_net in wanted:
            if compile_net and time.perf_counter() - started > args.budget_s - 120:
                variants.append({"method": "ect", "preset": largest, "precision": "bf16",
                                 "channels_last": channels_last,
                                 "compile": True, "skipped": "time budget spent"})
                continue
            variants.append(train_row(args, device, data, "ect", largest, "bf16", peak, channels_last, compile_net))
            free_memory(device)
            print(f"  ect {largest} bf16 channels_last={channels_last} compile={compile_net}: "
                  f"{variants[-1]['img_per_s']:8.1f} img/s, MFU {variants[-1]['mfu']:6.1%}", flush=True)

    sampling = sampling_rows(args, device, largest)
    inception = inception_row(args, device)

    print()
    header = (f"{'preset':>6} {'method':>6} {'prec':>5} {'cl':>3} {'comp':>4} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
              f"{'mem GiB':>8} {'load %':>7} {'loss bf16/fp32-1':>17}")
    print(header)
    print("-" * len(header))
    for row in rows + variants:
        if "skipped" in row:
            layout = "y" if row["channels_last"] else ""
            print(f"{row['preset']:>6} {row['method']:>6} {row['precision']:>5} {layout:>3} "
                  f"{'y':>4}  skipped: {row['skipped']}")
            continue
        memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        drift = f"{row['loss_rel_diff']:.2e}" if "loss_rel_diff" in row else ""
        print(f"{row['preset']:>6} {row['method']:>6} {row['precision']:>5} {'y' if row['channels_last'] else '':>3} "
              f"{'y' if row['compile'] else '':>4} {row['img_per_s']:>8.1f} {row['tflops']:>8.1f} {row['mfu']:>6.1%} "
              f"{memory:>8} {row['loading_share']:>7.2%} {drift:>17}"
              + (f"  (compile {row['compile_s']:.0f} s)" if row["compile"] else ""))
    print()
    for row in sampling:
        print(f"sampling {row['preset']} {row['sampler']:>8} {row['precision']} {row['steps']}-step: "
              f"{row['img_per_s']:9.1f} img/s (batch {row['batch_size']})")
    if "skipped" in inception:
        print(f"inception: skipped ({inception['skipped']})")
    else:
        print(f"inception-v3-compat ({inception['weights']} weights): {inception['img_per_s']:.1f} img/s "
              f"(batch {inception['batch_size']}, {args.resolution}px uint8 in)")

    timed = [row for row in rows + variants if "skipped" not in row]
    worst_share = max(row["loading_share"] for row in timed)
    ect_best = [row["mfu"] for row in timed
                if (row["method"], row["preset"], row["precision"]) == ("ect", "xl", "bf16")]
    result = {
        "benchmark": "gpu_check",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (Python 3.10 safe)
        "device": str(device), "device_name": device_name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": sys.version.split()[0],
        "matmul_peak_tflops_bf16": peak,
        "flop_convention": "2 FLOPs per multiply-add (FlopCounterMode); elementwise ops not counted",
        "args": {key: value for key, value in vars(args).items()},
        "train": rows, "variants": variants, "sampling": sampling, "inception": inception,
        "summary": {
            "device_name": device_name,
            "max_loading_share": worst_share,
            "loading_share_ok": worst_share < LOADING_SHARE_LIMIT,
            "ect_xl_bf16_best_mfu": max(ect_best) if ect_best else None,
            "wall_s": time.perf_counter() - started,
        },
    }
    print(f"\nworst data-loading share {worst_share:.2%} (limit {LOADING_SHARE_LIMIT:.0%}): "
          f"{'ok' if worst_share < LOADING_SHARE_LIMIT else 'TOO HIGH'}; "
          + (f"best ECT xl bf16 MFU {max(ect_best):.1%}; " if ect_best else "")
          + f"wall {result['summary']['wall_s']:.0f} s")
    text = json.dumps(result, indent=2) + "\n"
    for folder in dict.fromkeys([args.results_dir, args.out]):
        if folder is None:
            continue
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "gpu_check.json").write_text(text)
        print(f"wrote {Path(folder) / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
