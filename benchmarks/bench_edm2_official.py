"""cmscale's EDM2 training step against EDM2's own code (NVlabs/edm2) at equal configuration, on the CPU.

Needs a checkout of NVlabs/edm2, given by path (``--edm2-path`` or ``$CMSCALE_EDM2_OFFICIAL``); without one
the benchmark says so and skips (exit 0). Nothing is downloaded. Export one from a mirror with
``git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/edm2``.

Both variants build EDM2's network at a small configuration with the *same weights* (cmscale's
:class:`~cmscale.models.edm2.EDM2Net` has EDM2's ``Precond`` state dict, so one state dict loads into
both), class-conditional, and run interleaved, round by round, on identical draws: each step
reseeds the RNG, and both losses draw ln sigma from randn(B) and the noise from randn_like(x).
A timed step is the loss (EDM2's uncertainty-weighted loss with its log-variance head), backward
and an Adam update (EDM2's betas (0.9, 0.99), eps 1e-8), in fp32; forced weight normalisation runs in
both (training mode). EDM2's ``dnnlib`` imports ``requests`` and its training loop ``psutil``: empty
stand-ins are inserted when they are missing. As a check, the losses of the first draw are compared.

    python benchmarks/bench_edm2_official.py --edm2-path /tmp/edm2
    python benchmarks/bench_edm2_official.py --edm2-path /tmp/edm2 --quick   # seconds (CI smoke)

Writes benchmarks/results/edm2_vs_official.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from datetime import UTC, datetime
from pathlib import Path

import torch

from cmscale.models.edm2 import EDM2Net
from cmscale.models.edm2_loss import EDM2Loss
from cmscale.models.precond import EDMPrecond

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def import_official(path: Path):
    """(Precond, EDM2Loss) from an NVlabs/edm2 checkout."""
    if not (path / "training" / "networks_edm2.py").is_file():
        raise SystemExit(f"{path}: not an NVlabs/edm2 checkout (training/networks_edm2.py missing)")
    for name in ("requests", "psutil"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)  # imported for downloads and memory stats only
    sys.path.insert(0, str(path))
    from training.networks_edm2 import Precond
    from training.training_loop import EDM2Loss as OfficialLoss

    return Precond, OfficialLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edm2-path", default=os.environ.get("CMSCALE_EDM2_OFFICIAL"),
                        help="checkout of NVlabs/edm2 (or $CMSCALE_EDM2_OFFICIAL)")
    parser.add_argument("--model-channels", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--img-channels", type=int, default=3)
    parser.add_argument("--label-dim", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (each runs both variants once)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="the smallest setting (a few seconds)")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    args.quick = args.quick or args.smoke
    if args.quick:
        args.model_channels, args.resolution, args.batch_size, args.steps, args.warmup = 16, 16, 4, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.edm2_path:
        print("bench_edm2_official: skipped, no checkout of NVlabs/edm2 given (--edm2-path or $CMSCALE_EDM2_OFFICIAL)")
        return
    Precond, OfficialLoss = import_official(Path(args.edm2_path))
    network = dict(model_channels=args.model_channels, channel_mult=[1, 2, 2], num_blocks=2,
                   attn_resolutions=[args.resolution // 4], dropout=args.dropout)
    torch.manual_seed(0)
    official = Precond(args.resolution, args.img_channels, args.label_dim, use_fp16=False, **network)
    ours = EDM2Net(args.resolution, args.img_channels, args.label_dim, use_fp16=False, **network)
    ours.load_state_dict(official.state_dict(), strict=True)
    cmscale_model = EDMPrecond(ours, sigma_data=0.5)
    official_loss, cmscale_loss = OfficialLoss(P_mean=-0.8, P_std=1.6), EDM2Loss(P_mean=-0.8, P_std=1.6)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, args.img_channels, args.resolution, args.resolution, generator=generator)
    labels = torch.randint(args.label_dim, (args.batch_size,), generator=generator)
    onehot = torch.nn.functional.one_hot(labels, args.label_dim).float()
    variants = {
        "EDM2 (official)": (official, lambda: official_loss(official, images, onehot).sum() / args.batch_size),
        "cmscale": (cmscale_model, lambda: cmscale_loss(cmscale_model, images, labels=labels).mean()),
    }
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
                  for name, (model, _) in variants.items()}
    for model, _ in variants.values():
        model.train()

    def step(name: str, seed: int) -> tuple[float, float]:
        _, loss_fn = variants[name]
        torch.manual_seed(seed)
        start = time.perf_counter()
        loss = loss_fn()
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()
        return time.perf_counter() - start, loss.item()

    # ECT's and sCD's steps on the same network (cmscale only; EDM2 has neither): same labels, Adam
    from cmscale.config import RunConfig
    from cmscale.methods import build_method

    architecture = dict(family="edm2", channels=args.model_channels, blocks=2, channel_mult=[1, 2, 2],
                        attn_levels=[2])
    for method_name in ("ect", "scd"):
        config = RunConfig(method=method_name, preset="bench", architecture=architecture, dataset="cifar10",
                           data_path="unused", resolution=args.resolution, label_dim=args.label_dim,
                           teacher_ckpt="unused", budget_iters=1000, dropout=args.dropout,
                           scm={"warmup_iters": 0})
        method = build_method(config, args.img_channels, load_weights=False)
        network_of_method = method.network
        network_of_method.load_state_dict(ours.state_dict())
        if method.teacher is not None:
            method.teacher.edm.net.load_state_dict(ours.state_dict())
        method.model.train()
        method.set_iteration(500)  # ECT: a later stage, where most rows run the target pass

        def method_loss(method=method):
            draws = method.sample_draws(images.shape, images.device)
            return method.loss(images, labels, **draws).mean()

        variants[f"cmscale {method_name.upper()}"] = (method.model, method_loss)
        optimizers[f"cmscale {method_name.upper()}"] = torch.optim.Adam(
            method.trainable_parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)

    first = {name: step(name, 1000)[1] for name in variants}
    loss_difference = abs(first["EDM2 (official)"] - first["cmscale"]) / abs(first["EDM2 (official)"])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.warmup + args.steps):
        for name in variants:
            seconds, _ = step(name, 2000 + round_index)
            if round_index >= args.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = statistics.median(c / o for c, o in zip(times["cmscale"], times["EDM2 (official)"]))
    params = sum(p.numel() for p in ours.parameters())
    print(f"EDM2 training step (loss, backward, Adam) of EDM2's loss (and cmscale's ECT, sCD), "
          f"{args.model_channels} channels, mult (1, 2, 2), 2 blocks, "
          f"{params:,} parameters, {args.resolution}x{args.resolution}x{args.img_channels}, {args.label_dim} classes, "
          f"batch {args.batch_size}, fp32, cpu, {torch.get_num_threads()} threads; {args.steps} interleaved rounds")
    print(f"{'variant':<18} {'median s/step':>14} {'min s/step':>11} {'/ EDM2 (paired)':>16}")
    for name in variants:
        paired = statistics.median(c / o for c, o in zip(times[name], times["EDM2 (official)"]))
        print(f"{name:<18} {median[name]:>14.4f} {min(times[name]):>11.4f} {paired:>16.3f}")
    print(f"cmscale / EDM2 step time, median of per-round ratios: {ratio:.3f} (target <= 1.0)")
    print(f"losses on the first draw: relative difference {loss_difference:.2e}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "edm2_vs_official",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "device": "cpu", "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "config": {key: value for key, value in vars(args).items() if key != "edm2_path"} | {"params": params},
        "seconds_per_step_median": median,
        "seconds_per_step_all": times,
        "cmscale_over_official_paired_median": ratio,
        "first_draw_relative_loss_difference": loss_difference,
        "summary": {"cmscale_over_official_paired_median": round(ratio, 3), "target_1.0_met": ratio <= 1.0},
    }
    (RESULTS / "edm2_vs_official.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
