"""Run folders written with the real writers of cmscale.rundir, and SQL on the store they are ingested into."""

from __future__ import annotations

from pathlib import Path

from cmscale.results import connect, query
from cmscale.rundir import MetricsWriter, atomic_write_json, write_status


def write_run(root: Path, sweep: str, run_id: str, losses: list[float], fid: float) -> Path:
    run_dir = root / sweep / run_id
    atomic_write_json(run_dir / "config.json", {"method": "edm", "preset": "xxs", "sweep": sweep, "run_id": run_id,
                                                "seed": 0, "budget_iters": len(losses), "flops_per_step": 1e9})
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:
        for step, loss in enumerate(losses, start=1):
            writer.write({"kind": "train", "step": step, "images_seen": 4 * step, "train_flops": 1e9 * step,
                          "loss": loss, "wall_s": 0.1 * step})
        writer.write({"kind": "eval", "step": len(losses), "train_flops": 1e9 * len(losses), "sampler_steps": 1,
                      "nfe": 1, "fid": fid, "num_samples": 100, "extractor": "digits", "reference": "digits-train"})
    atomic_write_json(run_dir / "done.json", {"status": "done", "reason": None, "final_step": len(losses)})
    write_status(run_dir, "done")
    return run_dir


def rows(root: Path, sql: str) -> list[tuple]:
    with connect(root) as con:
        return con.execute(sql).fetchall()


SWEEP = "sw"


def train_row(rank: int, step: int, wall_s: float = 0.0) -> dict:
    # The loss encodes (rank, step), so the tests can check every stored value in SQL.
    return {
        "kind": "train",
        "step": step,
        "images_seen": 64 * step,
        "train_flops": 1e9 * step,
        "loss": rank + step * 1e-4,
        "wall_s": wall_s,
    }


def eval_row(step: int, sampler_steps: int, fid: float) -> dict:
    return {
        "kind": "eval",
        "step": step,
        "train_flops": 1e9 * step,
        "images_seen": 64 * step,
        "sampler_steps": sampler_steps,
        "nfe": sampler_steps,
        "fid": fid,
        "num_samples": 500,
        "extractor": "digits-classifier",
        "reference": "digits-train",
        "sampling_flops_per_image": 2e6 * sampler_steps,
        "wall_s": 1.0,
    }


def config_of(run_id: str, rank: int) -> dict:
    return {
        "method": "ect",
        "preset": "xs",
        "dataset": "digits",
        "resolution": 8,
        "batch_size": 64,
        "seed": rank,
        "budget_flops": None,
        "budget_iters": 100,
        "run_id": run_id,
        "params": 1000 + rank,
        "flops_per_step": 1e9,
        "flops_per_image_forward": 2e6,
        "budget_iters_resolved": 100,
        "img_channels": 1,
        "world_size": 1,
        "git_commit": "abc123",
        "sweep": SWEEP,
    }


def make_run(root: Path, rank: int, n_train: int, done: bool = True, evals: tuple = ()) -> Path:
    run_id = f"r{rank:02d}"
    run_dir = root / SWEEP / run_id
    atomic_write_json(run_dir / "config.json", config_of(run_id, rank))
    write_status(run_dir, "running")
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:
        for step in range(n_train):
            writer.write(train_row(rank, step))
        for row in evals:
            writer.write(row)
    if done:
        atomic_write_json(run_dir / "done.json", {"status": "done", "reason": None, "final_step": n_train - 1,
                                                  "train_flops": 1e9 * (n_train - 1), "wall_s": 3.0,
                                                  "started": 1.7e9, "finished": 1.7e9 + 3.0})
        write_status(run_dir, "done")
    return run_dir


def scalar(root: Path, sql: str):
    return query(sql, root, ingest_first=False).item()


def table_fingerprint(root: Path) -> dict:
    with connect(root) as con:
        return {
            table: con.execute(f"SELECT count(*), sum(hash(COLUMNS(*))) FROM (SELECT * FROM {table})").fetchall()
            for table in ("sweeps", "runs", "train", "evals", "trials")
        }
