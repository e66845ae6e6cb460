"""Images per second delivered to the training step from a 64x64 zip, and resident memory meanwhile.

Generates an EDM-format zip of 64x64 PNGs (smooth colour fields plus noise, ~9 KB each, about
the size of ImageNet 64's PNGs) with dataset.json labels, then reads it for ``--steps`` steps of
``--batch`` images with ``--workers`` DataLoader workers:

- cmscale: ``load_dataset`` (streamed) + ``StepBatches.batch(step)`` -> float images in [-1, 1] and labels;
- EDM2 (with ``--edm2-path``, a checkout of NVlabs/edm2): its ``ImageFolderDataset`` through a
  ``DataLoader`` with its ``InfiniteSampler`` at the same batch, workers and prefetch, spawned workers
  as ``train_edm2.py`` starts them, and the images scaled to [-1, 1] as its ``StandardRGBEncoder``
  does. Skipped without the path.

Each row times steady state (after ``--warmup`` batches, which include starting the workers) and
records the start-up separately; memory is the resident set of the main process and of the
main process plus its workers, sampled every step (peaks).

    python benchmarks/bench_data.py --quick                       # 2,000 images, seconds
    python benchmarks/bench_data.py --edm2-path /tmp/edm2         # 20,000 images, side by side

Prints a table and writes benchmarks/results/bench_data.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

RESULTS = Path(os.environ.get("CMSCALE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def write_zip(path: Path, count: int, side: int = 64, seed: int = 0) -> float:
    """An EDM-format zip of ``count`` PNGs (stored, as EDM's dataset_tool.py writes); returns MB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (64, 4, 4, 3), dtype=np.uint8)
    fields = [np.asarray(Image.fromarray(c).resize((side, side), Image.BILINEAR), dtype=np.int16) for c in coarse]
    labels = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in range(count):
            noise = rng.integers(-12, 13, (side, side, 3), dtype=np.int16)
            pixels = np.clip(fields[index % len(fields)] + noise, 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            name = f"{index // 1000:05d}/img{index:08d}.png"
            archive.writestr(name, buffer.getvalue())
            labels.append([name, index % 1000])
        archive.writestr("dataset.json", json.dumps({"labels": labels}))
    return path.stat().st_size / 1e6


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mb() -> tuple[float, float]:
    """(main process, main process + children) resident MB."""
    main = rss_mb(os.getpid())
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as handle:
            children = [int(pid) for pid in handle.read().split()]
    except OSError:
        children = []
    return main, main + sum(rss_mb(pid) for pid in children)


def measure(next_batch, steps: int, warmup: int, batch: int) -> dict:
    """Time ``next_batch()`` calls: start-up (the warm-up batches) and steady-state images/s."""
    before, _ = tree_rss_mb()
    started = time.perf_counter()
    for _ in range(warmup):
        next_batch()
    startup_s = time.perf_counter() - started
    peak_main = peak_tree = 0.0
    started = time.perf_counter()
    for _ in range(steps):
        images, labels = next_batch()
        assert images.shape[0] == batch and labels.shape[0] == batch
        main, tree = tree_rss_mb()
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
    seconds = time.perf_counter() - started
    return {"images_per_s": steps * batch / seconds, "startup_s": startup_s, "steady_s": seconds,
            "rss_main_before_mb": before, "rss_main_peak_mb": peak_main, "rss_tree_peak_mb": peak_tree}


def bench_cmscale(path: Path, batch: int, workers: int, steps: int, warmup: int) -> dict:
    from cmscale.data import load_dataset
    from cmscale.data.loader import StepBatches

    os.environ["CMSCALE_DATA_IN_MEMORY_BYTES"] = "0"  # stream, as a set too large to hold would be
    data = load_dataset("imagefolder", path=path)
    batches = StepBatches(data, batch, seed=0, num_workers=workers)
    steps_iter = iter(range(10**9))
    result = measure(lambda: batches.batch(next(steps_iter)), steps, warmup, batch)
    batches.close()
    return result


def bench_edm2(path: Path, edm2: Path, batch: int, workers: int, steps: int, warmup: int) -> dict:
    import torch

    sys.path.insert(0, str(edm2))
    from torch_utils import misc  # EDM2's
    from training.dataset import ImageFolderDataset  # EDM2's

    dataset = ImageFolderDataset(path=str(path), use_labels=True)
    # EDM2's InfiniteSampler passes the dataset to Sampler.__init__, which torch >= 2.4 no longer takes.
    original_init = torch.utils.data.Sampler.__init__
    torch.utils.data.Sampler.__init__ = lambda self, data_source=None: None
    try:
        sampler = misc.InfiniteSampler(dataset=dataset, rank=0, num_replicas=1, seed=0)
    finally:
        torch.utils.data.Sampler.__init__ = original_init
    # Spawned workers, as train_edm2.py sets: forked ones would share the ZipFile EDM2 opened in
    # __init__, and its reads then interleave (bad CRC).
    loader = iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch, num_workers=workers,
                                              prefetch_factor=2, pin_memory=torch.cuda.is_available(),
                                              multiprocessing_context="spawn"))

    def next_batch():
        images, labels = next(loader)
        return images.to(torch.float32) / 127.5 - 1, labels  # StandardRGBEncoder.encode_latents

    return measure(next_batch, steps, warmup, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images, 20 steps")
    parser.add_argument("--images", type=int, default=None, help="images in the generated zip (default 20,000)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 60; --quick 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--edm2-path", type=Path, default=os.environ.get("EDM2_PATH") or None,
                        help="a checkout of NVlabs/edm2 (default $EDM2_PATH; without it EDM2's row is skipped)")
    parser.add_argument("--smoke", action="store_true", help="the smallest setting, seconds (the CI smoke run)")
    args = parser.parse_args()
    if args.smoke:
        args.quick, args.images, args.steps, args.warmup, args.batch, args.workers = True, 256, 3, 1, 32, 1
    images = args.images or (2_000 if args.quick else 20_000)
    steps = args.steps or (20 if args.quick else 60)

    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-64x64.zip"
        started = time.perf_counter()
        size_mb = write_zip(path, images)
        generate_s = time.perf_counter() - started
        rows = {"cmscale": bench_cmscale(path, args.batch, args.workers, steps, args.warmup)}
        if args.edm2_path is not None:
            rows["edm2"] = bench_edm2(path, args.edm2_path, args.batch, args.workers, steps, args.warmup)

    table = Table(title=f"data loading: {images:,} 64x64 PNGs ({size_mb:.0f} MB zip), batch {args.batch}, "
                        f"{args.workers} workers, {steps} timed steps")
    for column in ("loader", "images/s", "vs EDM2", "start-up s", "RSS main MB (before/peak)", "RSS +workers MB"):
        table.add_column(column, justify="left" if column == "loader" else "right")
    for name, row in rows.items():
        ratio = f"{row['images_per_s'] / rows['edm2']['images_per_s']:.2f}x" if "edm2" in rows else "-"
        memory = f"{row['rss_main_before_mb']:.0f} / {row['rss_main_peak_mb']:.0f}"
        table.add_row(name, f"{row['images_per_s']:,.0f}", ratio, f"{row['startup_s']:.2f}", memory,
                      f"{row['rss_tree_peak_mb']:.0f}")
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "zip_mb": size_mb, "generate_s": generate_s, "batch": args.batch,
               "workers": args.workers, "steps": steps, "warmup": args.warmup, "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "results": rows,
               "summary": {"cmscale_images_per_s": round(rows["cmscale"]["images_per_s"]),
                           "cmscale_rss_main_growth_mb": round(rows["cmscale"]["rss_main_peak_mb"]
                                                               - rows["cmscale"]["rss_main_before_mb"]),
                           **({"edm2_images_per_s": round(rows["edm2"]["images_per_s"]),
                               "speedup_vs_edm2": round(rows["cmscale"]["images_per_s"]
                                                        / rows["edm2"]["images_per_s"], 2)} if "edm2" in rows else {})}}
    (RESULTS / "bench_data.json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {RESULTS / 'bench_data.json'}")


if __name__ == "__main__":
    main()
