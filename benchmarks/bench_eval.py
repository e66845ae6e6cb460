"""Cost of evaluation on this machine: the digits CNN, reference statistics, and one eval.

Measures, in a fresh cache directory:
- training the digits feature CNN (cold cache) and its held-out accuracy;
- reference statistics of the digits training set, cold (features of 1,797 images) and warm (cache);
- one ``evaluate_model`` of an xxs ECT network at 1 and 2 sampler steps: seconds per row and
  generated images per second (sampling plus features), at ``--num-samples``;
- the scores alone on those samples (features, FID, KID): FID only, and FID with KID over 5 and over
  20 subsets (torch-fidelity's KID: three polynomial-kernel matrices per subset, so its cost grows with
  the subset count and dominates the eval at small resolutions).

    python benchmarks/bench_eval.py            # 1,000 samples per FID (the digits default)
    python benchmarks/bench_eval.py --quick    # 200 samples

Prints a table and writes benchmarks/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 samples instead of 1,000")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.num_samples = args.num_samples or 50
    num_samples = args.num_samples or (200 if args.quick else 1000)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CMSCALE_CACHE_DIR"] = str(Path(tmp) / "cache")
        import torch
        from rich.console import Console
        from rich.table import Table

        from cmscale.config import RunConfig
        from cmscale.data import load_digits
        from cmscale.eval import evaluate_model, feature_space, reference_statistics
        from cmscale.eval.fid import scores_to_reference
        from cmscale.models.precond import EDMPrecond
        from cmscale.models.presets import build_unet

        if os.environ.get("CMSCALE_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["CMSCALE_NUM_THREADS"]))
        started = time.perf_counter()
        space = feature_space("digits")
        cnn_s = time.perf_counter() - started
        accuracy = torch.load(space.weights_path, weights_only=True)["holdout_accuracy"]
        data = load_digits(16)
        started = time.perf_counter()
        reference_statistics(data, space)
        ref_cold_s = time.perf_counter() - started
        started = time.perf_counter()
        reference_statistics(data, space)
        ref_warm_s = time.perf_counter() - started

        config = RunConfig(method="ect", preset="xxs", budget_iters=1, teacher_ckpt="unused-for-sampling",
                           eval={"num_samples": num_samples, "batch_size": 250, "grid_images": 0})
        torch.manual_seed(0)
        model = EDMPrecond(build_unet("xxs", 16, 1), sigma_min=config.ect.sigma_min).eval()
        rows = evaluate_model(config, model, step=0, train_flops=0.0, images_seen=0, run_dir=Path(tmp) / "run")
        reference, _ = reference_statistics(data, space)
        samples = data.images[torch.randint(0, len(data.images), (num_samples,),
                                            generator=torch.Generator().manual_seed(0))]
        scores_to_reference(samples, reference, kid_subsets=5)  # reference features cached first
        score_s = {}
        for subsets in (0, 5, 20):
            started = time.perf_counter()
            scores_to_reference(samples, reference, kid_subsets=subsets)
            score_s[subsets] = time.perf_counter() - started

    table = Table(title=f"evaluation cost ({torch.get_num_threads()} torch threads)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("digits CNN training (cold cache)", f"{cnn_s:.2f} s")
    table.add_row("digits CNN held-out accuracy", f"{accuracy:.3f}")
    table.add_row("reference stats, cold (1,797 images)", f"{ref_cold_s:.3f} s")
    table.add_row("reference stats, warm (cache hit)", f"{ref_warm_s:.4f} s")
    for row in rows:
        table.add_row(f"eval xxs ECT, {row['sampler_steps']} step(s), {num_samples} samples",
                      f"{row['wall_s']:.2f} s ({num_samples / row['wall_s']:.0f} img/s)")
    for subsets, seconds in score_s.items():
        what = "FID only" if subsets == 0 else f"FID + KID ({subsets} subsets)"
        table.add_row(f"scores of {num_samples} images: {what}", f"{seconds:.3f} s")
    Console().print(table)
    result = {
        "num_samples": num_samples,
        "threads": torch.get_num_threads(),
        "digits_cnn_train_s": cnn_s,
        "digits_cnn_holdout_accuracy": accuracy,
        "reference_cold_s": ref_cold_s,
        "reference_warm_s": ref_warm_s,
        "rows": rows,
        "summary": {
            "digits_cnn_train_s": round(cnn_s, 2),
            "reference_cold_s": round(ref_cold_s, 3),
            "reference_warm_s": round(ref_warm_s, 4),
            **{f"eval_{row['sampler_steps']}step_s": round(row["wall_s"], 2) for row in rows},
            **{f"scores_kid{subsets}_s": round(seconds, 3) for subsets, seconds in score_s.items()},
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
