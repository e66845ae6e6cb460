"""The training run: resume after a kill, non-finite losses, gloo data parallel, the CLI and its example.

Real runs on the CPU with tiny budgets (xxs preset, 16x16 digits). Subprocesses get one thread
(CMSCALE_NUM_THREADS=1) like the in-process runs, so their arithmetic is bit-identical.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cmscale.accounting import flops_per_step, iterations_for_budget
from cmscale.cli import main
from cmscale.config import RunConfig
from cmscale.distributed import average_gradients
from cmscale.methods import build_method
from cmscale.rundir import read_json, read_metrics
from cmscale.train import train

REPO = Path(__file__).resolve().parents[1]
NO_EVAL = {"at_fractions": []}  # FID evals are tested with cmscale.eval


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("CMSCALE_NUM_THREADS", "1")


def subprocess_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CMSCALE_RESULTS", "RANK", "WORLD_SIZE", "SLURM_"))
    }
    return env | {"CMSCALE_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


RUN_IN_SUBPROCESS = """
import json, sys
from cmscale.config import RunConfig
from cmscale.train import train
print(json.dumps(train(RunConfig.model_validate_json(sys.argv[1]), sys.argv[2]), default=str))
"""


def start_run(config: RunConfig, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN_IN_SUBPROCESS, config.model_dump_json(), str(run_dir)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(process: subprocess.Popen, metrics: Path, rows: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while len(read_metrics(metrics, "train")) < rows:
        if process.poll() is not None:
            raise AssertionError(f"run ended before {rows} rows: {process.communicate()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("run made no progress")
        time.sleep(0.02)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_metrics(run_dir / "metrics.jsonl", "train")]


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_replays_the_uninterrupted_run(tmp_path):
    config = RunConfig(method="edm", preset="xxs", batch_size=4, budget_iters=40, dropout=0.1, ckpt_every=10,
                       log_every=1, ema_rates=[0.9], eval=NO_EVAL, seed=3)
    run_dir = tmp_path / "interrupted"

    # 1. SIGTERM: deferred to the step boundary, checkpointed, status "interrupted".
    process = start_run(config, run_dir)
    wait_for_rows(process, run_dir / "metrics.jsonl", 3)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["status"] == "interrupted" and 3 <= result["final_step"] < 30
    assert read_json(run_dir / "status.json")["state"] == "interrupted"
    assert not (run_dir / "done.json").exists()

    # 2. SIGKILL between periodic checkpoints: rows after the last checkpoint get written again.
    process = start_run(config, run_dir)
    wait_for_rows(process, run_dir / "metrics.jsonl", result["final_step"] + 8)
    process.kill()
    process.communicate(timeout=60)

    # 3. Finish in this process.
    done = train(config, run_dir)
    assert done["status"] == "done" and done["final_step"] == 40

    reference_dir = tmp_path / "uninterrupted"
    assert train(config, reference_dir)["status"] == "done"
    resumed, reference = losses(run_dir), losses(reference_dir)
    assert [step for step, _ in resumed] == list(range(1, 41))  # each step exactly once
    assert resumed == reference  # bit-identical loss trajectory
    for name in ("config.json", "done.json", "ckpt/latest.pt", "ckpt/final.pt"):
        assert (run_dir / name).is_file(), name
    final = torch.load(run_dir / "ckpt" / "final.pt", weights_only=True)
    reference_final = torch.load(reference_dir / "ckpt" / "final.pt", weights_only=True)
    for key, value in reference_final["net"].items():
        torch.testing.assert_close(final["net"][key], value, rtol=0, atol=0)


def test_non_finite_loss_fails_the_run_without_training_on(tmp_path):
    teacher = build_method(RunConfig(method="edm", preset="xxs", budget_iters=1), img_channels=1).model.net
    state = {
        key: torch.full_like(value, math.nan) if value.is_floating_point() else value
        for key, value in teacher.state_dict().items()
    }
    torch.save({"net": state}, tmp_path / "nan_teacher.pt")
    config = RunConfig(
        method="ect",
        preset="xxs",
        batch_size=4,
        budget_iters=5,
        teacher_ckpt=str(tmp_path / "nan_teacher.pt"),
        log_every=1,
        eval=NO_EVAL,
    )
    run_dir = tmp_path / "run"
    done = train(config, run_dir)
    assert done["status"] == "failed" and "non-finite loss" in done["reason"] and "step 1" in done["reason"]
    on_disk = read_json(run_dir / "done.json")
    assert on_disk["status"] == "failed" and on_disk["reason"] == done["reason"] and on_disk["final_step"] == 0
    assert read_json(run_dir / "status.json")["state"] == "failed"
    assert read_metrics(run_dir / "metrics.jsonl") == []
    assert not (run_dir / "ckpt" / "final.pt").exists()


DDP_WORKER = """
import json, sys
from pathlib import Path
import torch
from cmscale.config import RunConfig
from cmscale.methods import build_method
from cmscale.distributed import average_gradients, init_distributed
from cmscale.train import train

out = Path(sys.argv[1])
rank, world = init_distributed(torch.device("cpu"))
config = RunConfig.model_validate_json(sys.argv[2])
torch.manual_seed(0)
method = build_method(config, img_channels=1)
method.set_iteration(10**6)
generator = torch.Generator().manual_seed(123)
x0 = torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1
t = torch.rand(8, generator=generator) * 1.4 + 0.1
noise = torch.randn(8, 1, 16, 16, generator=generator)
share = slice(rank * 4, rank * 4 + 4)
method.loss_fn(method.model, x0[share], t=t[share], noise=noise[share]).mean().backward()
average_gradients(method.trainable_parameters(), world)
if rank == 0:
    torch.save([p.grad for p in method.trainable_parameters()], out / "grads.pt")
print(json.dumps(train(config, out / "run")))
# Ended here, not by interpreter shutdown, where gloo's threads can abort the exit (-6).
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_gloo_gives_the_gradient_of_the_whole_batch(tmp_path):
    config = RunConfig(method="sct", preset="xxs", batch_size=8, budget_iters=3, log_every=1, eval=NO_EVAL,
                       scm={"warmup_iters": 2})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(2):
        env = subprocess_env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen([sys.executable, "-c", DDP_WORKER, str(tmp_path), config.model_dump_json()],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]

    # One process, the whole batch, the same draw.
    torch.manual_seed(0)
    method = build_method(config, img_channels=1)
    method.set_iteration(10**6)
    generator = torch.Generator().manual_seed(123)
    x0 = torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1
    t = torch.rand(8, generator=generator) * 1.4 + 0.1
    noise = torch.randn(8, 1, 16, 16, generator=generator)
    method.loss_fn(method.model, x0, t=t, noise=noise).mean().backward()
    average_gradients(method.trainable_parameters(), 1)
    distributed = torch.load(tmp_path / "grads.pt", weights_only=True)
    single = [p.grad for p in method.trainable_parameters()]
    assert len(distributed) == len(single)
    assert sum(float(g.abs().sum()) for g in single) > 0
    for got, expected in zip(distributed, single):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    # The same ranks ran a whole (3-step) run: rank 0 wrote it, each step once.
    run_dir = tmp_path / "run"
    assert read_json(run_dir / "done.json")["status"] == "done"
    assert read_json(run_dir / "config.json")["world_size"] == 2
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3]


def test_budget_in_flops_converts_with_the_counted_flops_per_step():
    per_step = flops_per_step(RunConfig(method="edm", preset="xxs", batch_size=16, budget_iters=1))
    config = RunConfig(method="edm", preset="xxs", batch_size=16, budget_flops=10.4 * per_step)
    assert iterations_for_budget(config) == 10


def test_cli_reports_bad_fields_and_missing_teachers(tmp_path):
    runner = CliRunner()
    toml = REPO / "examples" / "train_digits_ect.toml"
    result = runner.invoke(main, ["train", str(toml), "--out", str(tmp_path / "a"), "--set", "lr=-1"])
    assert result.exit_code != 0 and "lr" in result.output and str(toml) in result.output
    result = runner.invoke(
        main, ["train", str(toml), "--out", str(tmp_path / "b"), "--set", "teacher_ckpt='nowhere/final.pt'"]
    )
    assert result.exit_code != 0 and "teacher_ckpt" in result.output and "nowhere/final.pt" in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cmscale_train_runs_the_digits_ect_example(tmp_path):
    """The example as shipped, on a fresh directory: a quick teacher first, then ECT from it."""
    cmscale = [str(Path(sys.executable).with_name("cmscale"))]
    teacher = subprocess.run(
        [*cmscale, "train", str(REPO / "examples" / "train_digits_edm.toml"), "--set", "budget_iters=20"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    student = subprocess.run(
        [*cmscale, "train", str(REPO / "examples" / "train_digits_ect.toml")],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert student.returncode == 0, student.stderr[-3000:]
    run_dir = tmp_path / "results" / "examples" / "train_digits_ect"
    for name in ("config.json", "metrics.jsonl", "ckpt/latest.pt", "ckpt/final.pt", "done.json"):
        assert (run_dir / name).is_file(), name
    done = read_json(run_dir / "done.json")
    config = read_json(run_dir / "config.json")
    assert done["status"] == "done" and done["final_step"] == config["budget_iters_resolved"]
    # ECT's steps cost more as stages advance; flops_per_step is the run-average, rounded to a whole FLOP.
    assert abs(done["train_flops"] - done["final_step"] * config["flops_per_step"]) <= done["final_step"] / 2
    rows = read_metrics(run_dir / "metrics.jsonl", "train")
    assert [row["step"] for row in rows] == list(range(10, done["final_step"] + 1, 10))
    assert all(math.isfinite(row["loss"]) for row in rows)
    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    assert sorted((row["sampler_steps"], row["nfe"]) for row in evals) == [(1, 1), (2, 2)]
    assert all(row["step"] == done["final_step"] and math.isfinite(row["fid"]) for row in evals)
