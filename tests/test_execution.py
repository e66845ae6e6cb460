"""Execution options (cmscale.models.execution: compile, channels_last; bf16 autocast), the step loader, and
the GPU check script.

None of these may change what is computed: compiled and eager losses agree, a channels_last run logs
the losses of a contiguous run, bf16 autocast trains every method, the loader gives the batches the
trainer always drew, and benchmarks/gpu_check.py imports nothing its GPU machine lacks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmscale.accounting import flops_per_step
from cmscale.config import RunConfig
from cmscale.data import load_digits
from cmscale.data.loader import StepBatches, step_seed
from cmscale.methods import build_method
from cmscale.models.execution import compile_network
from cmscale.models.losses import ECTLoss
from cmscale.models.precond import EDMPrecond
from cmscale.models.unet import UNet
from cmscale.rundir import read_metrics
from cmscale.sweep.plan import run_id_for
from cmscale.train import train

REPO = Path(__file__).resolve().parents[1]
NO_EVAL = {"at_fractions": []}
# What the integrator's GPU machine does not have (benchmarks/gpu_check.py must not need any of it).
ABSENT_ON_GPU_MACHINE = ("pydantic", "duckdb", "polars", "submitit", "optuna", "click", "torch_fidelity", "rich",
                         "seaborn", "matplotlib", "statsmodels", "sklearn", "pyarrow", "tomli_w")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("CMSCALE_NUM_THREADS", "1")


def random_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim > 1:
                parameter.normal_(0, 0.5 / math.sqrt(parameter[0].numel()))
            elif "norm" not in name:
                parameter.normal_(0, 0.05)
    return module


def test_compiled_and_eager_ect_losses_and_gradients_agree():
    # The smallest UNet that still has attention, so that the SDPA switch is traced too. The
    # aot_eager backend runs Dynamo's capture and AOTAutograd's joint graph (where compiled and
    # eager semantics can part: no_grad target pass, restored RNG state) without inductor's C++
    # build, which takes minutes on a CPU; inductor is exercised on CUDA by benchmarks/gpu_check.py.
    net = random_weights(UNet(img_resolution=4, img_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1,
                              attn_resolutions=(4,)), seed=0)
    model = EDMPrecond(net, sigma_min=0.002)
    loss_fn = ECTLoss()
    x0 = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t = torch.tensor([0.1, 0.8, 3.0, 20.0])
    noise = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))

    def loss_and_grads():
        net.zero_grad()
        loss = loss_fn(model, x0, t=t, noise=noise).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    compile_network(net, backend="aot_eager")
    compiled_loss, compiled_grads = loss_and_grads()
    assert eager_loss > 0
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-7)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    assert not any("_orig_mod" in key for key in net.state_dict())  # checkpoints do not depend on compile


def _write_teacher(path: Path) -> None:
    config = RunConfig(method="edm", preset="xxs", budget_iters=1)
    net = random_weights(build_method(config, img_channels=1).model.net, seed=7)
    torch.save({"net": net.state_dict()}, path)


@pytest.mark.parametrize("method", ["edm", "ect", "sct", "scd"])
def test_bf16_autocast_trains_every_method_on_cpu(tmp_path, method):
    teacher = tmp_path / "teacher.pt"
    _write_teacher(teacher)
    x0 = load_digits().batch(torch.arange(16))
    results = {}
    for precision in ("fp32", "bf16"):
        config = RunConfig(method=method, preset="xxs", budget_iters=1, precision=precision,
                           teacher_ckpt=str(teacher) if method != "edm" else None, scm={"warmup_iters": 0})
        torch.manual_seed(0)
        built = build_method(config, img_channels=1)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = built.loss(x0).mean()
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in built.trainable_parameters() if p.grad is not None])
        results[precision] = (float(loss.detach()), grad)
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert math.isfinite(loss16) and bool(torch.isfinite(grad16).all()) and grad16.norm() > 0
    # bf16 keeps the loss and the descent direction of fp32 (sCM's JVP itself runs in fp32).
    assert abs(loss16 - loss32) <= 0.05 * abs(loss32) + 1e-3
    assert float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.95


def test_channels_last_run_logs_the_losses_of_a_contiguous_run(tmp_path):
    base = {"method": "edm", "preset": "xs", "budget_iters": 3, "log_every": 1, "batch_size": 8, "eval": NO_EVAL}
    logged = {}
    for channels_last in (False, True):
        run_dir = tmp_path / f"cl{channels_last}"
        train(RunConfig(**base, channels_last=channels_last), run_dir)
        logged[channels_last] = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl", "train")]
    assert len(logged[True]) == 3
    assert logged[True] == pytest.approx(logged[False], rel=1e-4)
    # Execution options do not change a run's identity (so neither its sweep run id).
    fast = RunConfig(**base, channels_last=True, compile=True, tf32=False)
    assert fast.identity() == RunConfig(**base).identity()
    assert run_id_for(fast) == run_id_for(RunConfig(**base))


def test_step_batches_draw_the_trainers_images_and_split_them_over_ranks():
    data = load_digits()
    whole = StepBatches(data, batch_size=8, seed=3)
    # The draw the trainer has always made: indices from a generator seeded by (seed, step).
    generator = torch.Generator().manual_seed(step_seed(3, 5))
    expected = data.batch(torch.randint(len(data), (8,), generator=generator))
    torch.testing.assert_close(whole(5), expected, rtol=0, atol=0)
    halves = [StepBatches(data, batch_size=8, seed=3, rank=rank, world=2)(5) for rank in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the world size"):
        StepBatches(data, batch_size=7, seed=0, world=2)


BLOCK_AND_RUN = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None  # import of a blocked name raises ImportError
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def run_gpu_check(*args: str, hide_cuda: bool) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    code = BLOCK_AND_RUN.format(absent=ABSENT_ON_GPU_MACHINE)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_gpu_check_says_no_cuda_and_exits_zero_without_a_gpu():
    result = run_gpu_check(hide_cuda=True)
    assert result.returncode == 0, result.stderr
    assert "no CUDA" in result.stdout


def test_gpu_check_dry_run_on_cpu_with_only_torch_and_numpy(tmp_path):
    # The packages the GPU machine lacks are blocked; a missing torch-fidelity skips the Inception row.
    result = run_gpu_check("--device", "cpu", "--quick", "--presets", "xxs", "--methods", "edm,sct",
                           "--results-dir", str(tmp_path), hide_cuda=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(row["method"], row["precision"]) for row in report["train"]] == [
        ("edm", "bf16"), ("edm", "fp32"), ("sct", "bf16"), ("sct", "fp32")]
    assert all(row["img_per_s"] > 0 for row in report["train"])
    # Its FLOPs per step are the trainer's count (built without cmscale.methods, which needs pydantic).
    for row in report["train"]:
        config = RunConfig(method=row["method"], preset="xxs", dataset="cifar10", data_path=str(tmp_path),
                           resolution=32, batch_size=4, budget_iters=1)  # counting reads no data
        assert row["flops_per_step"] == flops_per_step(config)
    sampled = {(row["steps"], row["sampler"]) for row in report["sampling"]}
    assert sampled == {(1, "edm"), (2, "edm"), (1, "trigflow"), (2, "trigflow")}
    assert "torch-fidelity not importable" in report["inception"]["skipped"]
