"""cmscale's ECT step against the official one (locuslab/ect) at equal configuration, at stage 0.

Needs a checkout of locuslab/ect, given by path (``--ect-path`` or ``$CMSCALE_ECT_OFFICIAL``); without
one the benchmark says so and skips (exit 0). Nothing is downloaded.

Three variants run interleaved, round by round, on identical draws (each step reseeds the RNG, and
both losses draw t as randn(B) and the noise as randn_like(x), so t, r and the noise agree):

- ``official``: locuslab/ect's ``ECMLoss`` with its own ``ECMPrecond`` + ``SongUNet`` (DDPM++);
- ``official loss, cmscale net``: the same ``ECMLoss`` driving cmscale's network (isolates the loss);
- ``cmscale``: cmscale's ``ECTLoss`` (target only on rows with r > 0, dropout masks replayed).

The networks are the same DDPM++ configuration with the *same weights* (cmscale's ``ddpmpp`` presets
share EDM's state-dict layout, so one state dict loads into both), dropout 0.2, no augmentation,
stage 0 (q = 2, sigmoid mapping: about 81% of rows have r = 0). Each timed step is loss, backward
and a RAdam update. On a machine without CUDA the official loss's ``torch.cuda.get_rng_state`` /
``set_rng_state`` are pointed at the CPU generator (what the official code does on a GPU, on the
CPU). The official ``dnnlib`` imports ``requests`` for downloads; when it is not installed an empty
stand-in module is inserted (the benchmark never downloads). As a check, the per-sample losses of
``official`` and ``cmscale`` on the first draw are compared.

    python benchmarks/bench_ect_official.py --ect-path /work/ect-official
    python benchmarks/bench_ect_official.py --ect-path /work/ect-official --preset ddpmpp --batch-size 128  # GPU

Writes benchmarks/results/ect_vs_official.json.
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
from torch import nn

from cmscale.models.losses import ECTLoss
from cmscale.models.precond import EDMPrecond
from cmscale.models.presets import get_preset

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def import_official(path: Path):
    """(ECMLoss, ECMPrecond) from a locuslab/ect checkout, importable without CUDA or requests."""
    if not (path / "training" / "loss.py").is_file():
        raise SystemExit(
            f"{path}: not a locuslab/ect checkout (training/loss.py missing); export one with "
            "`git --git-dir=<mirror> archive HEAD | tar -x -C <dir>`"
        )
    try:
        import requests  # noqa: F401
    except ImportError:
        sys.modules["requests"] = types.ModuleType("requests")  # dnnlib imports it for downloads only
    sys.path.insert(0, str(path))
    from training.loss import ECMLoss
    from training.networks import ECMPrecond

    return ECMLoss, ECMPrecond


class CmscaleNetForOfficialLoss(nn.Module):
    """cmscale's denoiser behind the official call signature ``net(x, sigma, labels, augment_labels=...)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, sigma, labels=None, augment_labels=None):
        return self.model(x, sigma.reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ect-path",
        default=os.environ.get("CMSCALE_ECT_OFFICIAL"),
        help="checkout of locuslab/ect (or $CMSCALE_ECT_OFFICIAL)",
    )
    parser.add_argument("--preset", default="ddpmpp-s", help="a ddpmpp preset (ddpmpp is EDM's CIFAR-10 network)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.resolution, args.batch_size, args.steps, args.warmup = 16, 4, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.ect_path:
        print("bench_ect_official: skipped, no checkout of locuslab/ect given (--ect-path or $CMSCALE_ECT_OFFICIAL)")
        return
    spec = get_preset(args.preset)
    if spec.architecture != "ddpmpp":
        raise SystemExit(f"--preset {args.preset} is not a ddpmpp preset; the official ECT network is DDPM++")
    device = torch.device(args.device)
    ECMLoss, ECMPrecond = import_official(Path(args.ect_path))
    if device.type != "cuda":
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
        torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from cmscale.models.presets import build_unet

    torch.manual_seed(0)
    cmscale_net = build_unet(args.preset, args.resolution, 3, dropout=args.dropout)
    official_model = ECMPrecond(
        img_resolution=args.resolution,
        img_channels=3,
        model_type="SongUNet",
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
        model_channels=spec.model_channels,
        channel_mult=list(spec.channel_mult),
        num_blocks=spec.num_blocks,
        attn_resolutions=list(spec.attn_resolutions(args.resolution)),
        augment_dim=spec.augment_dim,
        dropout=args.dropout,
    )
    official_model.model.load_state_dict(cmscale_net.state_dict(), strict=True)  # the same weights in both
    # sigma_min = 0: in training mode ECMPrecond uses the plain EDM coefficients.
    cmscale_model = EDMPrecond(cmscale_net, sigma_data=0.5, sigma_min=0.0)
    adapted = CmscaleNetForOfficialLoss(EDMPrecond(build_unet(args.preset, args.resolution, 3, dropout=args.dropout)))
    adapted.model.net.load_state_dict(cmscale_net.state_dict())

    official_loss = ECMLoss(P_mean=-1.1, P_std=2.0, sigma_data=0.5, q=2, c=0.0, k=8.0, b=1.0, adj="sigmoid")
    official_loss.update_schedule(0)
    cmscale_loss = ECTLoss(P_mean=-1.1, P_std=2.0, sigma_data=0.5, q=2.0, k=8.0, b=1.0, c=0.0, mapping="sigmoid")
    cmscale_loss.set_iteration(0)

    variants = {
        "official": (official_model, lambda model, x: official_loss(model, x)),
        "official loss, cmscale net": (adapted, lambda model, x: official_loss(model, x)),
        "cmscale": (cmscale_model, lambda model, x: cmscale_loss(model, x)),
    }
    optimizers = {}
    for name, (model, _) in variants.items():
        model.to(device).train()
        optimizers[name] = torch.optim.RAdam(model.parameters(), lr=1e-4)
    images = torch.rand(
        args.batch_size, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1)
    )
    images = (images * 2 - 1).to(device)

    def step(name: str, seed: int) -> tuple[float, torch.Tensor]:
        model, loss_fn = variants[name]
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        synchronize(device)
        start = time.perf_counter()
        loss = loss_fn(model, images)
        optimizers[name].zero_grad(set_to_none=True)
        loss.mean().backward()
        optimizers[name].step()
        synchronize(device)
        return time.perf_counter() - start, loss.detach().flatten()

    # The first draw: all three start from the same weights, so their losses must agree.
    first = {name: step(name, 1000)[1] for name in variants}
    loss_difference = (first["official"] - first["cmscale"]).abs().max().item()
    rows_with_target = int((cmscale_loss.t_to_r(_draw_t(1000, args.batch_size, device)) > 0).sum())
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.warmup + args.steps):
        for name in variants:
            seconds, _ = step(name, 2000 + round_index)
            if round_index >= args.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    # Expected counted FLOPs per step at stage 0: the official step runs the target on the whole batch
    # whenever any row has r > 0 (probability 1 - (1 - p)^B); cmscale's on the rows with r > 0 (p B).
    from cmscale.accounting import ect_step_parts
    from cmscale.config import RunConfig

    online, target = ect_step_parts(
        RunConfig(
            method="ect",
            preset=args.preset,
            dataset="cifar10",
            data_path="unused",  # the step parts depend on the shapes only
            resolution=args.resolution,
            batch_size=args.batch_size,
            dropout=args.dropout,
            budget_iters=1,
            teacher_ckpt="unused",
        )
    )
    share = cmscale_loss.target_row_fraction(0)
    flops = {"official": online + (1 - (1 - share) ** args.batch_size) * target, "cmscale": online + share * target}
    # Rounds share their draws across variants, so the per-round ratio is the paired statistic; its
    # median is the headline (robust to load that changes between rounds on a shared machine).
    speedup = statistics.median(o / c for o, c in zip(times["official"], times["cmscale"]))
    speedup_same_net = statistics.median(o / c for o, c in zip(times["official loss, cmscale net"], times["cmscale"]))

    print(
        f"ECT step at stage 0, {args.preset} (DDPM++, {spec.model_channels} channels) at {args.resolution}x"
        f"{args.resolution}x3, batch {args.batch_size}, dropout {args.dropout}, {device}, "
        f"{torch.get_num_threads()} threads; median of {args.steps} interleaved rounds"
    )
    print(f"{'variant':<30} {'median s/step':>14} {'min s/step':>11}")
    for name in variants:
        print(f"{name:<30} {median[name]:>14.4f} {min(times[name]):>11.4f}")
    print(
        f"official / cmscale step time, median of per-round ratios: {speedup:.3f} (same network under both "
        f"losses: {speedup_same_net:.3f}); "
        f"speed-up {100 * (1 - 1 / speedup):.1f}% less time per step"
    )
    print(
        f"expected counted FLOPs per step: official {flops['official']:.4g}, cmscale {flops['cmscale']:.4g} "
        f"(ratio {flops['official'] / flops['cmscale']:.3f}; fastest-step ratio "
        f"{min(times['official']) / min(times['cmscale']):.3f})"
    )
    print(
        f"losses on the first draw, official vs cmscale: max |difference| = {loss_difference:.2e} "
        f"({rows_with_target}/{args.batch_size} rows with r > 0)"
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "ect_vs_official",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "config": {key: value for key, value in vars(args).items() if key != "ect_path"} | {"stage": 0},
        "seconds_per_step_median": median,
        "seconds_per_step_all": times,
        "official_over_cmscale_paired_median": speedup,
        "official_loss_same_net_over_cmscale": speedup_same_net,
        "first_draw_max_loss_difference": loss_difference,
        "expected_flops_per_step": flops,
        "fastest_step_ratio": min(times["official"]) / min(times["cmscale"]),
        "summary": {"official_over_cmscale_paired_median": round(speedup, 3), "target_1.15_met": speedup >= 1.15},
    }
    (RESULTS / "ect_vs_official.json").write_text(json.dumps(result, indent=2))


def _draw_t(seed: int, batch: int, device: torch.device) -> torch.Tensor:
    torch.manual_seed(seed)
    return (torch.randn(batch, device=device) * 2.0 - 1.1).exp()


if __name__ == "__main__":
    main()
