"""One training run, end to end and resumable: ``train(config, run_dir)``.

The run writes only into ``run_dir`` (see :mod:`cmscale.rundir`). Started again on the same
directory it resumes from the newest checkpoint (:mod:`cmscale.checkpoint`), and drops metric rows
logged after it, so every step appears exactly once; a resume with other settings is refused
(:mod:`cmscale.resume`). SIGTERM, USR2 and SIGINT stop the run at a step boundary with a
checkpoint (:mod:`cmscale.stopping`). Progress goes to status.json, stdout and optionally
TensorBoard (:mod:`cmscale.progress`). The iteration count comes from
:func:`cmscale.accounting.iterations_for_budget`, the function the sweep planner uses too.

Data parallel: with ``WORLD_SIZE > 1`` (torchrun, or submitit's environment on SLURM) every rank
computes its share of the batch, gradients are averaged with ``all_reduce``, and rank 0 writes
(see :mod:`cmscale.distributed`).

Randomness is a function of (seed, step, rank): the images, times and noise of a step are drawn
for the whole batch from seeds of (seed, step) and split across ranks by rows; the dropout masks
come from the global RNG reseeded by (seed, step, rank). A resumed run therefore replays exactly
the steps an uninterrupted run would take, and a data-parallel run (without dropout) takes the same
steps, with the same loss, as one process with the whole batch.

A non-finite loss (averaged over ranks) ends the run before the optimiser step, with status
``failed`` and the reason in ``done.json``. Times in ``done.json`` are Unix seconds; ``started`` is
the first start of the run, kept across resumes. Search workers and submitit's jobs
(:mod:`cmscale.cluster.jobs`) checkpoint the run in progress through :func:`save_active_run`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from cmscale.accounting import flops_per_step, iterations_for_budget, train_flops_at
from cmscale.checkpoint import CheckpointError, CheckpointIO, save_checkpoint
from cmscale.config import RunConfig
from cmscale.data import describe_storage, load_dataset
from cmscale.data.loader import StepBatches, step_seed
from cmscale.distributed import (
    any_rank,
    average_gradients,
    broadcast_parameters,
    init_distributed,
    is_writer_process,
    mean_over_ranks,
    pick_device,
)
from cmscale.methods import Method, build_method
from cmscale.models.ema import EMA
from cmscale.models.execution import compile_network, to_channels_last
from cmscale.models.flops import forward_flops
from cmscale.models.phema import save_snapshot
from cmscale.models.precond import network_of
from cmscale.models.unet import count_parameters
from cmscale.progress import Progress, check_tensorboard_installed
from cmscale.resume import check_resume_config
from cmscale.rundir import (
    CONFIG_FILE,
    DONE_FILE,
    DONE_STATE_KEY,
    ITERATIONS_KEY,
    METRICS_FILE,
    Heartbeat,
    MetricsWriter,
    RunState,
    atomic_write_json,
    final_checkpoint,
    latest_checkpoint,
    previous_checkpoint,
    read_json,
    truncate_metrics_after,
    write_status,
)
from cmscale.schedule import learning_rate
from cmscale.stopping import StopSignals, signals_deferred

SHARED_DRAWS = 4095  # the rank slot of step_seed that seeds the draws of the whole batch (times, noise)

__all__ = ["IterationMismatchError", "Trainer", "active_trainer", "record_failure", "save_active_run", "train"]


class IterationMismatchError(ValueError):
    """The plan's iteration count differs from the one this code computes for the same config."""


def seed_generator(seed: int, device: torch.device) -> None:
    """Seed the generator a step's random draws come from. On the CPU this is the stream
    torch.manual_seed gives, without also seeding every accelerator backend of a CUDA build
    (about 2 ms a call here, twice a step: 4% of a small model's step)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


class Trainer:
    """The live state of a run (method, optimiser, EMA, step), its one step and its checkpoints.

    ``iterations`` is the plan's count when the sweep planner gave one; the trainer computes the
    count with the same function and refuses to start when the two differ (a stale plan).
    """

    def __init__(self, config: RunConfig, run_dir: Path, iterations: int | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        if config.tensorboard:
            check_tensorboard_installed()
        self.device = pick_device(config.device)
        self.rank, self.world = init_distributed(self.device)
        self.is_writer = self.rank == 0
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} does not split evenly over {self.world} ranks; "
                             f"set batch_size to a multiple of the world size")
        self.flops_per_step = flops_per_step(config)
        self.iterations = iterations_for_budget(config)
        if iterations is not None and iterations != self.iterations:
            raise IterationMismatchError(
                f"the plan gives {iterations} iterations but this code computes {self.iterations} for the same "
                f"config ({self.flops_per_step} FLOPs per step); plan the sweep again with this code")
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.data = load_dataset(config.dataset, path=config.data_path, resolution=config.resolution,
                                 vae_path=config.vae_path)
        if config.label_dim and config.label_dim != self.data.label_dim:
            raise ValueError(f"label_dim {config.label_dim} does not fit the data: {config.dataset} has "
                             f"{self.data.label_dim or 'no'} class labels; set label_dim = {self.data.label_dim}")
        self.batches = StepBatches(self.data, config.batch_size, config.seed, self.rank, self.world, self.device)
        if self.is_writer and config.dataset == "imagefolder":  # held in memory or streamed: the log says which
            print(describe_storage(self.data, self.batches.num_workers or None), file=sys.stderr, flush=True)
        if config.fid_reference is not None:  # a wrong reference fails now, not at the first eval
            from cmscale.eval.run import check_reference

            check_reference(config)
        if self.device.type == "cuda":
            # TF32 tensor cores for fp32 matmuls and convolutions (tf32 = false keeps full fp32).
            torch.backends.cuda.matmul.allow_tf32 = config.tf32
            torch.backends.cudnn.allow_tf32 = config.tf32
            torch.backends.cudnn.benchmark = True
        self.method: Method = build_method(config, self.data.channels, self.device, iterations=self.iterations)
        if self.world > 1:
            broadcast_parameters([self.method.model, *self.method.extra_modules])
        if config.channels_last:
            to_channels_last(self.method.model, self.method.teacher)
        self.ema = EMA(self.method.model, config.ema_sigma_rels, config.ema_rates)
        if config.compile:
            compile_network(self.method.network)  # after the EMA copies (see compile_network)
        self.params = self.method.trainable_parameters()
        if config.optimizer == "radam":
            self.optimizer = torch.optim.RAdam(self.params, lr=config.lr, betas=config.adam_betas)
        else:
            # The fused kernel (CUDA and CPU) updates every parameter in one pass instead of a chain of
            # per-tensor ops: on the demo's small networks the per-tensor Adam was 10-15% of a step.
            self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=config.adam_betas,
                                              fused=self.device.type in ("cuda", "cpu"))
        self.checkpoints = CheckpointIO(self.method.meta, model=self.method.model, extra=self.method.extra_modules,
                                        emas=self.ema, optimizer=self.optimizer)
        self.step = 0
        self.wall_offset_s = 0.0
        self.started = time.time()
        self.first_started = self.started  # kept across resumes, for done.json
        self.forced_changes: list[str] = []
        self.resume_notes: list[str] = []
        self.saved_step: int | None = None  # the step latest.pt holds
        self.eval_steps = sorted({max(1, round(fraction * self.iterations)) for fraction in config.eval.at_fractions})

    def train_flops(self, step: int) -> int:
        """Counted FLOPs of the first ``step`` steps (ECT's depend on the stage; see accounting.train_flops_at)."""
        return train_flops_at(self.config, step)

    def wall_s(self) -> float:
        return self.wall_offset_s + time.time() - self.started

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        # Saving twice at one step (the periodic save, then the end of the run) would make the
        # previous checkpoint a copy of the latest instead of an older good one.
        if self.is_writer and self.saved_step != self.step:
            self.saved_step = self.step
            self.checkpoints.save(latest_checkpoint(self.run_dir), previous=previous_checkpoint(self.run_dir),
                                  step=self.step, wall_s=self.wall_s(), first_started=self.first_started)

    def resume(self) -> bool:
        """Load the newest good checkpoint (``latest.pt``, else ``previous.pt``); whether one was found.

        A file that cannot be loaded is moved aside and named in ``resume_notes``; raises
        CheckpointError when checkpoints exist but none loads."""
        path, values, self.resume_notes = self.checkpoints.load_newest(self.run_dir, move_bad=self.is_writer)
        if path is None:
            return False
        self.step = int(values["step"])
        self.wall_offset_s = float(values["wall_s"])
        self.first_started = float(values.get("first_started", self.first_started))
        if path == latest_checkpoint(self.run_dir):
            self.saved_step = self.step
        return True

    def save_final(self) -> None:
        if self.is_writer:
            payload = self.method.meta | {"net": network_of(self.ema.evaluated).state_dict(), "step": self.step,
                                          "label_dropout": self.config.label_dropout}  # guidance needs to know
            save_checkpoint(final_checkpoint(self.run_dir), payload)

    def save_phema_snapshots(self) -> None:
        """Each power EMA's network now, for post-hoc EMA reconstruction (``cmscale ema reconstruct``)."""
        if self.is_writer:
            for sigma_rel, average in zip(self.config.ema_sigma_rels, self.ema.averages):
                save_snapshot(self.run_dir, self.step, sigma_rel, network_of(average).state_dict())

    # -- one step -------------------------------------------------------------------------------
    def batch(self) -> torch.Tensor:
        """This rank's share of the step's batch; the whole batch depends only on (seed, step)."""
        return self.batches(self.step)

    def draws(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """This rank's rows of the step's times and noise, drawn for the whole batch from (seed, step)."""
        seed_generator(step_seed(self.config.seed, self.step, SHARED_DRAWS), self.device)
        whole = self.method.sample_draws((self.config.batch_size, *x0.shape[1:]), self.device)
        rows = slice(self.rank * x0.shape[0], (self.rank + 1) * x0.shape[0])
        return {name: value[rows] for name, value in whole.items()}

    def train_step(self) -> float:
        """One optimiser step; returns the loss averaged over ranks.

        A non-finite loss returns before the update (and before ``step`` advances), so the
        weights never absorb it.
        """
        self.method.set_iteration(self.step)
        x0 = self.batch()
        draws = self.draws(x0)
        seed_generator(step_seed(self.config.seed, self.step, self.rank), self.device)
        autocast = torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"
        )
        labels = self.batches.labels(self.step) if self.config.label_dim else None
        with autocast:
            loss = self.method.loss(x0, labels, **draws).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.params, self.world)
        value = mean_over_ranks(loss, self.world)
        if not math.isfinite(value):
            return value
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.step, self.iterations)
        self.optimizer.step()
        self.ema.update(self.step + 1)  # this update's 1-based count, as the power EMA's decay needs
        self.step += 1
        return value


_ACTIVE: Trainer | None = None  # the run this process is training; read through active_trainer()


def active_trainer() -> Trainer | None:
    """The trainer of the run this process is training now, or None between runs."""
    return _ACTIVE


def save_active_run() -> Trainer | None:
    """Checkpoint the run this process is training (the hook for submitit's ``checkpoint`` of a
    job or a search worker about to be requeued); returns its trainer, or None when none runs."""
    trainer = _ACTIVE
    if trainer is not None:
        trainer.save()
    return trainer


# ----------------------------------------------------------------------------------------------
# The run's files: config.json at the start, done.json at the end


def _write_config(trainer: Trainer) -> None:
    path = trainer.run_dir / CONFIG_FILE
    config = trainer.config
    resolved = config.model_dump(mode="json") | {
        "run_id": config.run_id or trainer.run_dir.name,
        "params": count_parameters(trainer.method.network),
        "flops_per_step": trainer.flops_per_step,
        "flops_per_image_forward": forward_flops(trainer.method.network),
        ITERATIONS_KEY: trainer.iterations,
        "img_channels": trainer.data.channels,
        "world_size": trainer.world,
        "git_commit": git_commit(),
        "conventions": trainer.method.conventions,
    }
    if trainer.forced_changes:
        # --force: config.json tells what the rest of the run used, and keeps the history of changes.
        previous = read_json(path) if path.is_file() else {}
        history = list(previous.get("forced_changes", []))
        resolved["forced_changes"] = history + [{"at_step": trainer.step, "changes": trainer.forced_changes}]
        atomic_write_json(path, resolved)
    elif not path.is_file():
        atomic_write_json(path, resolved)


def record_failure(run_dir: Path, reason: str, phase: str | None, with_traceback: bool = False) -> dict[str, Any]:
    """done.json and status.json say ``failed`` with the reason (and the traceback being handled), so
    `sweep status` shows it; the one writer of failures that happen outside the loop. Returns done.json."""
    now = time.time()
    done: dict[str, Any] = {DONE_STATE_KEY: RunState.FAILED, "reason": reason}
    if phase is not None:
        done["phase"] = phase
    if with_traceback:
        done["traceback"] = traceback.format_exc(limit=20)
    done |= {"finished": now, "started": now, "final_step": None}
    if is_writer_process():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(run_dir) / DONE_FILE, done)
        write_status(Path(run_dir), RunState.FAILED)
    return done


def _finish(trainer: Trainer, status: RunState, reason: str | None) -> dict[str, Any]:
    """Write done.json (times in Unix seconds; ``started`` is the first start, before any resume)."""
    done = {
        DONE_STATE_KEY: status,
        "reason": reason,
        "final_step": trainer.step,
        "train_flops": trainer.train_flops(trainer.step),
        "wall_s": trainer.wall_s(),
        "started": trainer.first_started,
        "finished": time.time(),
    }
    if trainer.resume_notes:
        done["resume_notes"] = trainer.resume_notes  # checkpoints set aside on the way
    if trainer.is_writer:
        atomic_write_json(trainer.run_dir / DONE_FILE, done)
        write_status(trainer.run_dir, status)
    return done


def _interrupt(trainer: Trainer, stop: StopSignals, signal_name: str) -> dict[str, Any]:
    """Stop on a signal: checkpoint, status ``interrupted``, then hand the signal on (requeue)."""
    trainer.save()
    if trainer.is_writer:
        write_status(trainer.run_dir, RunState.INTERRUPTED, step=trainer.step, signal=signal_name)
    rank = f"rank {trainer.rank}/{trainer.world} " if trainer.world > 1 else ""
    print(f"cmscale: {rank}stopped at step {trainer.step} on {signal_name}; checkpoint saved (step {trainer.step} "
          f"of {trainer.iterations}), started again the run resumes from it", file=sys.stderr, flush=True)
    stop.hand_on(signal_name, trainer.is_writer, trainer.world)
    return {DONE_STATE_KEY: RunState.INTERRUPTED, "reason": f"signal {signal_name}", "final_step": trainer.step}


# ----------------------------------------------------------------------------------------------
# The loop


def train(config: RunConfig, run_dir: Path | str, on_eval=None, iterations: int | None = None,
          force: bool = False, record_failures: bool = False) -> dict[str, Any]:
    """Train (or resume) one run in ``run_dir``; returns the content of ``done.json``.

    ``on_eval(rows) -> bool`` is called with each eval point's rows; returning True stops the run
    early with status ``pruned`` (used by the Optuna search). ``iterations``: the plan's count,
    checked against the trainer's own (see :class:`Trainer`). A resume must use the settings in
    ``config.json`` (ResumeConfigError names the fields that differ) unless ``force``. With
    ``record_failures`` (jobs), an exception is recorded in ``done.json`` before it propagates.
    A run stopped by a signal returns status ``interrupted`` (its done.json is not written).
    """
    global _ACTIVE
    run_dir = Path(run_dir)
    if (run_dir / DONE_FILE).is_file():
        return read_json(run_dir / DONE_FILE)
    if os.environ.get("CMSCALE_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["CMSCALE_NUM_THREADS"]))
    phase = "start-up"
    try:
        forced_changes = check_resume_config(config, run_dir, force)
        # Built before the directory is created: a bad teacher path leaves nothing behind.
        trainer = Trainer(config, run_dir, iterations)
        trainer.forced_changes = forced_changes
        run_dir.mkdir(parents=True, exist_ok=True)
        phase = "training"
        _ACTIVE = trainer
        try:
            with StopSignals() as stop:
                return _run(trainer, stop, on_eval)
        finally:
            _ACTIVE = None
    except Exception as error:
        if record_failures and not (run_dir / DONE_FILE).is_file():
            try:
                record_failure(run_dir, f"{phase} failed: {type(error).__name__}: {error}", phase)
            except OSError as write_error:  # the disk that failed the run may refuse done.json too
                print(f"warning: {run_dir}: could not record the failure ({write_error})", file=sys.stderr)
        raise


def _run(trainer: Trainer, stop: StopSignals, on_eval) -> dict[str, Any]:
    config, run_dir = trainer.config, trainer.run_dir
    try:
        resumed = trainer.resume()
    except CheckpointError as error:
        return _finish(trainer, RunState.FAILED, f"cannot resume: {error}")
    for note in trainer.resume_notes:
        print(f"warning: {note}; resumed from the previous checkpoint (step {trainer.step})", file=sys.stderr)
    resume_facts = {"resumed_from": trainer.step if resumed else None,
                    **({"resume_notes": trainer.resume_notes} if trainer.resume_notes else {})}
    metrics = progress = None
    if trainer.is_writer:
        truncate_metrics_after(run_dir / METRICS_FILE, trainer.step)
        _write_config(trainer)
        write_status(run_dir, RunState.RUNNING, step=trainer.step, **resume_facts)
        metrics = MetricsWriter(run_dir / METRICS_FILE)
        progress = Progress(run_dir, trainer.iterations, config.batch_size, config.log_every, trainer.step,
                            config.tensorboard)
    try:
        with Heartbeat(run_dir, config.heartbeat_s) if trainer.is_writer else nullcontext():
            while trainer.step < trainer.iterations:
                with signals_deferred():
                    loss = trainer.train_step()
                    if not math.isfinite(loss):
                        reason = (
                            f"non-finite loss ({loss}) at step {trainer.step + 1}; the update was skipped and the "
                            f"run stopped (lower lr, check the data and the teacher checkpoint)"
                        )
                        return _finish(trainer, RunState.FAILED, reason)
                    step = trainer.step
                    if metrics and (step % config.log_every == 0 or step == trainer.iterations):
                        metrics.write({"kind": "train", "step": step, "images_seen": step * config.batch_size,
                                       "train_flops": trainer.train_flops(step), "loss": loss,
                                       "wall_s": trainer.wall_s()})
                    if progress:
                        progress.step(step, loss)
                    if step in trainer.eval_steps:
                        rows = run_evals(trainer)
                        if metrics:
                            for row in rows:
                                metrics.write(row)
                            progress.evals(rows)
                        stop_search = trainer.is_writer and on_eval is not None and bool(on_eval(rows))
                        if any_rank(stop_search, trainer.world, trainer.device):
                            trainer.save()
                            trainer.save_final()
                            return _finish(trainer, RunState.PRUNED, f"stopped by the search at step {step}")
                    if config.phema_every and step % config.phema_every == 0:
                        trainer.save_phema_snapshots()
                    if step % config.ckpt_every == 0:
                        trainer.save()
                signal_name = stop.agreed(trainer.world, trainer.device)  # every rank stops at the same step
                if signal_name:
                    return _interrupt(trainer, stop, signal_name)
            trainer.save()
            trainer.save_final()
            return _finish(trainer, RunState.DONE, None)
    finally:
        if metrics:
            metrics.close()
        if progress:
            progress.close()


def run_evals(trainer: Trainer) -> list[dict[str, Any]]:
    """FID of the evaluated EMA at this step for each sampler step count (see cmscale.eval)."""
    if not trainer.is_writer or not trainer.config.eval.at_fractions:
        return []
    from cmscale.eval import evaluate_model

    return evaluate_model(
        trainer.config,
        trainer.ema.evaluated,
        step=trainer.step,
        train_flops=trainer.train_flops(trainer.step),
        images_seen=trainer.step * trainer.config.batch_size,
        run_dir=trainer.run_dir,
        device=trainer.device,
    )
