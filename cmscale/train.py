"""One training run, end to end and resumable: ``train(config, run_dir)``.

The run writes only into ``run_dir`` (see :mod:`cmscale.rundir`). Started again on the same
directory it resumes from the newest checkpoint, and drops metric rows logged after it, so every
step appears exactly once. Signals (SIGTERM from ``scancel``/``scontrol requeue``, USR2 from
submitit before a timeout or preemption) are deferred to step boundaries, where the state is
consistent: the run checkpoints and exits, and the requeued job picks up from disk.

Data parallel: with ``WORLD_SIZE > 1`` (torchrun, or submitit's environment on SLURM) every rank
computes its share of the batch, gradients are averaged with ``all_reduce``, and rank 0 writes
(see :mod:`cmscale.distributed`). The iteration count comes from
:func:`cmscale.methods.iterations_for_budget`, the function the sweep planner uses too.

Search workers stop and checkpoint the run in progress through :func:`save_active_run`.

Randomness is a function of (seed, step, rank): the images, times and noise of a step are drawn
for the whole batch from seeds of (seed, step) and split across ranks by rows; the dropout masks
come from the global RNG reseeded by (seed, step, rank). A resumed run therefore replays exactly
the steps an uninterrupted run would take, and a data-parallel run (without dropout) takes the same
steps, with the same loss, as one process with the whole batch.

Stopping a data-parallel run: every rank catches SIGTERM and USR2, and at each step boundary the
ranks agree (all-reduce) whether any was signalled, so all stop after the same step. Rank 0 saves
the checkpoint, the ranks wait for it (barrier), and only then does rank 0 hand a USR2 to
submitit's handler, which requeues the job. Left to submitit, only rank 0 would stop on USR2 and
the other ranks would run on into a collective with no partner.

Packed runs: :class:`PackJob` trains several runs one after the other in one process (one array
task), each in its own folder; on a requeue it skips the runs that are done and resumes the others.

A non-finite loss (averaged over ranks) ends the run before the optimiser step, with status
``failed`` and the reason in ``done.json``. Times in ``done.json`` are Unix seconds; ``started`` is
the first start of the run, kept across resumes.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import submitit
import torch
from pydantic import ValidationError

from cmscale.accounting import flops_per_step, iterations_for_budget, train_flops_at
from cmscale.config import RunConfig, format_validation_error
from cmscale.data import describe_storage, load_dataset
from cmscale.data.loader import StepBatches, step_seed
from cmscale.distributed import (
    any_rank,
    average_gradients,
    barrier,
    broadcast_parameters,
    init_distributed,
    max_over_ranks,
    mean_over_ranks,
    pick_device,
)
from cmscale.methods import Method, build_method, checkpoint_meta, metadata_mismatches, network_of
from cmscale.models.ema import power_ema_decay, power_ema_gamma
from cmscale.models.execution import compile_network, to_channels_last
from cmscale.models.flops import forward_flops
from cmscale.models.phema import save_snapshot
from cmscale.models.unet import count_parameters
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

DEFERRED_SIGNALS = {signal.SIGTERM, signal.SIGUSR2}
# Settings that cannot change a run's result: a resume may change them freely.
RESUME_MAY_CHANGE = frozenset({"log_every", "ckpt_every", "heartbeat_s", "device", "run_id", "sweep"})

SHARED_DRAWS = 4095  # the rank slot of step_seed that seeds the draws of the whole batch (times, noise)
STOP_CODES = {None: 0, "SIGTERM": 1, "SIGUSR2": 2}  # ranks agree on the strongest request (USR2: requeue)

__all__ = [
    "CheckpointError", "IterationMismatchError", "PackJob", "ResumeConfigError", "TrainJob", "Trainer",
    "active_trainer", "save_active_run", "train",
]




# ----------------------------------------------------------------------------------------------
# Signals and heartbeat


class StopFlag:
    """Set by SIGTERM/USR2; the loop checks it at step boundaries."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.requeue_handler = None  # submitit's USR2 handler, called by rank 0 once every rank stopped

    def handler(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = signal.Signals(signum).name


@contextmanager
def signals_deferred():
    """Hold SIGTERM and USR2 until the end of the block, so handlers run between steps."""
    signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED_SIGNALS)


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(RuntimeError):
    """No checkpoint of the run could be loaded; the message names each file and what was wrong."""


def seed_generator(seed: int, device: torch.device) -> None:
    """Seed the generator a step's random draws come from. On the CPU this is the stream
    torch.manual_seed gives, without also seeding every accelerator backend of a CUDA build
    (about 2 ms a call here, twice a step: 4% of a small model's step)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def save_checkpoint(path: Path, payload: dict[str, Any], previous: Path | None = None) -> None:
    """Write to a temporary file, sync it, then rename: a reader never sees a half-written checkpoint.

    With ``previous``, the checkpoint being replaced is first renamed there, so a good one stays
    on disk until the new one is complete (a crash between the two renames leaves only ``previous``,
    which a resume finds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp_path, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if previous is not None and path.is_file():
        os.replace(path, previous)
    os.replace(tmp_path, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None if absent); an unreadable file raises CheckpointError naming it."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - empty, truncated or foreign files all mean "unreadable"
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint")
    return state


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def move_aside(path: Path) -> Path:
    """Rename a bad file out of the way (kept for inspection, never read again)."""
    target = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    return target


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ----------------------------------------------------------------------------------------------
# The run


class IterationMismatchError(ValueError):
    """The plan's iteration count differs from the one this code computes for the same config."""


class Trainer:
    """Holds the live state of a run so that a signal handler can checkpoint it between steps.

    ``iterations`` is the plan's count when the sweep planner gave one; the trainer computes the
    count with the same function and refuses to start when the two differ (a stale plan).
    """

    def __init__(self, config: RunConfig, run_dir: Path, iterations: int | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
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
        self.batches = StepBatches(self.data, config.batch_size, config.seed, self.rank, self.world, self.device)
        if self.is_writer and config.dataset == "imagefolder":  # held in memory or streamed: the log says which
            print(describe_storage(self.data, self.batches.num_workers or None), file=sys.stderr, flush=True)
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
        # Power EMAs first (decay set per step by their gamma), then the fixed rates; emas[0] is evaluated.
        self.ema_gammas = [power_ema_gamma(sigma_rel) for sigma_rel in config.ema_sigma_rels]
        self.emas = [copy.deepcopy(self.method.model).eval().requires_grad_(False)
                     for _ in [*self.ema_gammas, *config.ema_rates]]
        if config.compile:
            compile_network(network_of(self.method.model))  # after the EMA copies (see compile_network)
        # Gathered once: walking the modules for them every step cost 2.4 ms of a 85 ms step (t6).
        self.ema_sources = ([param.detach() for param in self.method.model.parameters()],
                            list(self.method.model.buffers()))
        self.ema_targets = [(list(ema.parameters()), list(ema.buffers())) for ema in self.emas]
        self.params = self.method.trainable_parameters()
        if config.optimizer == "radam":
            self.optimizer = torch.optim.RAdam(self.params, lr=config.lr, betas=config.adam_betas)
        else:
            # The fused kernel (CUDA and CPU) updates every parameter in one pass instead of a chain of
            # per-tensor ops: on the demo's small networks the per-tensor Adam was 10-15% of a step.
            self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=config.adam_betas,
                                              fused=self.device.type in ("cuda", "cpu"))
        self.step = 0
        self.wall_offset_s = 0.0
        self.started = time.time()
        self.first_started = self.started  # kept across resumes, for done.json
        self.forced_changes: list[str] = []
        self.resume_notes: list[str] = []
        self.saved_step: int | None = None  # the step latest.pt holds
        self.eval_steps = sorted({max(1, round(fraction * self.iterations)) for fraction in config.eval.at_fractions})

    # -- state ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return checkpoint_meta(self.config, self.data.channels) | {
            "step": self.step,
            "model": self.method.model.state_dict(),
            "extra": [module.state_dict() for module in self.method.extra_modules],
            "emas": [ema.state_dict() for ema in self.emas],
            "optimizer": self.optimizer.state_dict(),
            "wall_s": self.wall_s(),
            "first_started": self.first_started,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        problems = metadata_mismatches(state, checkpoint_meta(self.config, self.data.channels))
        if problems:
            raise CheckpointError(f"made for another run: {'; '.join(problems)}")
        self.step = int(state["step"])
        self.method.model.load_state_dict(state["model"])
        for module, module_state in zip(self.method.extra_modules, state["extra"]):
            module.load_state_dict(module_state)
        for ema, ema_state in zip(self.emas, state["emas"]):
            ema.load_state_dict(ema_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.wall_offset_s = float(state["wall_s"])
        self.first_started = float(state.get("first_started", self.first_started))

    def train_flops(self, step: int) -> int:
        """Counted FLOPs of the first ``step`` steps (ECT's depend on the stage; see methods.train_flops_at)."""
        return train_flops_at(self.config, step)

    def wall_s(self) -> float:
        return self.wall_offset_s + time.time() - self.started

    def save(self) -> None:
        # Saving twice at one step (the periodic save, then the end of the run) would make the
        # previous checkpoint a copy of the latest instead of an older good one.
        if self.is_writer and self.saved_step != self.step:
            self.saved_step = self.step
            save_checkpoint(latest_checkpoint(self.run_dir), self.state(), previous=previous_checkpoint(self.run_dir))

    def resume(self) -> tuple[bool, list[str]]:
        """Load the newest good checkpoint: ``latest.pt``, else ``previous.pt``.

        A file that cannot be loaded is moved aside and named in the returned notes. Returns
        (resumed, notes); raises CheckpointError when checkpoints exist but none loads."""
        notes: list[str] = []
        for path in (latest_checkpoint(self.run_dir), previous_checkpoint(self.run_dir)):
            try:
                state = load_checkpoint(path)
                if state is None:
                    continue
                self.load_state(state)
                if path == latest_checkpoint(self.run_dir):
                    self.saved_step = self.step
                return True, notes
            except Exception as error:  # noqa: BLE001 - a bad checkpoint of any kind is set aside, not fatal yet
                if isinstance(error, CheckpointError):
                    detail = str(error)
                else:
                    detail = f"{type(error).__name__}: {_first_line(error)}"
                if str(path) not in detail:
                    detail = f"{path}: {detail}"
                if self.is_writer and path.is_file():
                    detail += f"; moved to {move_aside(path).name}"
                notes.append(detail)
        if notes:
            raise CheckpointError("; ".join(notes) + f". No good checkpoint is left; to start the run fresh, remove "
                                  f"{self.run_dir} (or train into another folder)")
        return False, notes

    def save_final(self) -> None:
        if self.is_writer:
            ema = self.emas[0] if self.emas else self.method.model
            save_checkpoint(final_checkpoint(self.run_dir), checkpoint_meta(self.config, self.data.channels) | {
                "net": network_of(ema).state_dict(),
                "step": self.step,
            })

    def save_phema_snapshots(self) -> None:
        """Each power EMA's network now, for post-hoc EMA reconstruction (``cmscale ema reconstruct``)."""
        if self.is_writer:
            for sigma_rel, ema in zip(self.config.ema_sigma_rels, self.emas):
                save_snapshot(self.run_dir, self.step, sigma_rel, network_of(ema).state_dict())

    # -- one step ---------------------------------------------------------------------------
    def batch(self) -> torch.Tensor:
        """This rank's share of the step's batch; the whole batch depends only on (seed, step)."""
        return self.batches(self.step)

    def draws(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """This rank's rows of the step's times and noise, drawn for the whole batch from (seed, step)."""
        seed_generator(step_seed(self.config.seed, self.step, SHARED_DRAWS), self.device)
        whole = self.method.sample_draws((self.config.batch_size, *x0.shape[1:]), self.device)
        rows = slice(self.rank * x0.shape[0], (self.rank + 1) * x0.shape[0])
        return {name: value[rows] for name, value in whole.items()}

    def learning_rate(self) -> float:
        return learning_rate(self.config, self.step, self.iterations)

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
        with autocast:
            loss = self.method.loss(x0, **draws).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.params, self.world)
        value = mean_over_ranks(loss, self.world)
        if not math.isfinite(value):
            return value
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        self.optimizer.step()
        self.update_emas()
        self.step += 1
        return value

    @torch.no_grad()
    def update_emas(self) -> None:
        params, buffers = self.ema_sources
        updates = self.step + 1  # this update's 1-based count, as the power EMA's decay needs
        rates = [power_ema_decay(updates, gamma) for gamma in self.ema_gammas] + list(self.config.ema_rates)
        for rate, (ema_params, ema_buffers) in zip(rates, self.ema_targets):
            torch._foreach_lerp_(ema_params, params, 1 - rate)
            for ema_buffer, buffer in zip(ema_buffers, buffers):
                ema_buffer.copy_(buffer)


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


def _write_config(trainer: Trainer) -> None:
    from cmscale import methods  # the one added field; kept out of the import block for easy merges

    path = trainer.run_dir / CONFIG_FILE
    config = trainer.config
    resolved = config.model_dump(mode="json") | {
        "run_id": config.run_id or trainer.run_dir.name,
        "params": count_parameters(network_of(trainer.method.model)),
        "flops_per_step": trainer.flops_per_step,
        "flops_per_image_forward": forward_flops(network_of(trainer.method.model)),
        ITERATIONS_KEY: trainer.iterations,
        "img_channels": trainer.data.channels,
        "world_size": trainer.world,
        "git_commit": git_commit(),
        "conventions": methods.method_conventions(config, trainer.data.channels),
    }
    if trainer.forced_changes:
        # --force: config.json tells what the rest of the run used, and keeps the history of changes.
        previous = read_json(path) if path.is_file() else {}
        history = list(previous.get("forced_changes", []))
        resolved["forced_changes"] = history + [{"at_step": trainer.step, "changes": trainer.forced_changes}]
        atomic_write_json(path, resolved)
    elif not path.is_file():
        atomic_write_json(path, resolved)


class ResumeConfigError(ValueError):
    """A resume asked for settings that change the run's result; the message names each field."""


def resume_differences(config: RunConfig, stored: dict[str, Any]) -> list[str]:
    """``field: stored -> new`` for each setting that differs from config.json and may change the result.

    Settings missing from an older config.json are not compared; RESUME_MAY_CHANGE never is."""
    new = config.model_dump(mode="json")
    may_change = set(RESUME_MAY_CHANGE)
    if config.teacher_run_id and stored.get("teacher_run_id") == config.teacher_run_id:
        may_change.add("teacher_ckpt")  # the same planned teacher, found under a moved results root
    differences = []
    for key in RunConfig.model_fields:
        if key in may_change or key not in stored:
            continue
        old_value, new_value = stored[key], new[key]
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            differences += [f"{key}.{sub}: {old_value.get(sub)!r} -> {new_value.get(sub)!r}"
                            for sub in sorted(set(old_value) | set(new_value))
                            if old_value.get(sub) != new_value.get(sub)]
        elif old_value != new_value:
            differences.append(f"{key}: {old_value!r} -> {new_value!r}")
    return differences


def check_resume_config(config: RunConfig, run_dir: Path, force: bool) -> list[str]:
    """Compare ``config`` with the run's config.json; refuse differences unless ``force``. Returns them."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        stored = read_json(path)
    except ValueError as error:
        raise ResumeConfigError(
            f"{path} is not valid JSON ({error}); remove {run_dir} to start the run fresh"
        ) from None
    differences = resume_differences(config, stored)
    if differences and not force:
        raise ResumeConfigError(
            f"{run_dir} holds a run started with other settings; resuming with these would change its result:\n  "
            + "\n  ".join(differences)
            + f"\nResume with the settings of {path}, train into another folder, or pass --force to continue "
            "with the new settings (recorded in config.json as forced_changes). Only "
            + ", ".join(sorted(RESUME_MAY_CHANGE - {"run_id", "sweep"})) + " may change freely."
        )
    return differences


def _is_writer_process() -> bool:
    """Whether this process is the writer (rank 0), before the process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def record_failure(run_dir: Path, reason: str, phase: str) -> None:
    """done.json and status.json say ``failed`` with the reason, so `sweep status` shows it."""
    if not _is_writer_process():
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    atomic_write_json(run_dir / DONE_FILE, {DONE_STATE_KEY: RunState.FAILED, "reason": reason, "phase": phase,
                                            "finished": now, "started": now, "final_step": None})
    write_status(run_dir, RunState.FAILED)


def _finish(run_dir: Path, status: RunState, reason: str | None, trainer: Trainer, started: float) -> dict[str, Any]:
    """Write done.json (times in Unix seconds; ``started`` is the first start, before any resume)."""
    done = {
        DONE_STATE_KEY: status,
        "reason": reason,
        "final_step": trainer.step,
        "train_flops": trainer.train_flops(trainer.step),
        "wall_s": trainer.wall_s(),
        "started": started,
        "finished": time.time(),
    }
    if trainer.resume_notes:
        done["resume_notes"] = trainer.resume_notes  # checkpoints set aside on the way
    if trainer.is_writer:
        atomic_write_json(run_dir / DONE_FILE, done)
        write_status(run_dir, status)
    return done


def learning_rate(config: RunConfig, step: int, iterations: int) -> float:
    """The lr of optimiser step ``step`` (0-based) of a run of ``iterations`` steps.

    Linear warm-up over ``lr_warmup_iters``; then constant, or (``lr_schedule = "cosine"``)
        lr * (f + (1 - f) (1 + cos(pi p)) / 2),  p = (step - warmup) / (iterations - 1 - warmup),
    which starts at lr and reaches lr * f (f = ``lr_final_ratio``) on the last step.
    """
    warmup = config.lr_warmup_iters
    if warmup and step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - warmup) / max(1, iterations - 1 - warmup))
    final = config.lr_final_ratio
    return config.lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(config: RunConfig, run_dir: Path | str, on_eval=None, iterations: int | None = None,
          force: bool = False, record_failures: bool = False) -> dict[str, Any]:
    """Train (or resume) one run in ``run_dir``; returns the content of ``done.json``.

    ``on_eval(rows) -> bool`` is called with each eval point's rows; returning True stops the run
    early with status ``pruned`` (used by the Optuna search). ``iterations``: the plan's count,
    checked against the trainer's own (see :class:`Trainer`). A resume must use the settings in
    ``config.json`` (ResumeConfigError names the fields that differ) unless ``force``. With
    ``record_failures`` (jobs), an exception is recorded in ``done.json`` before it propagates.
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
        _ACTIVE = trainer
        stop = StopFlag()
        # One process lets submitit's USR2 handler act between steps; several ranks must first agree on
        # the step to stop at, so each catches USR2 too and _run hands it on (see the module docstring).
        caught = (signal.SIGTERM, signal.SIGUSR2) if trainer.world > 1 else (signal.SIGTERM,)
        previous_handlers = {signum: signal.signal(signum, stop.handler) for signum in caught}
        stop.requeue_handler = previous_handlers.get(signal.SIGUSR2)
        phase = "training"
        try:
            return _run(trainer, stop, on_eval)
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            _ACTIVE = None
    except Exception as error:
        if record_failures and not (run_dir / DONE_FILE).is_file():
            record_failure(run_dir, f"{phase} failed: {type(error).__name__}: {error}", phase)
        raise


def _run(trainer: Trainer, stop: StopFlag, on_eval) -> dict[str, Any]:
    config, run_dir = trainer.config, trainer.run_dir
    try:
        resumed, notes = trainer.resume()
    except CheckpointError as error:
        return _finish(run_dir, RunState.FAILED, f"cannot resume: {error}", trainer, trainer.first_started)
    trainer.resume_notes = notes
    for note in notes:
        print(f"warning: {note}; resumed from the previous checkpoint (step {trainer.step})", file=sys.stderr)
    if trainer.is_writer:
        truncate_metrics_after(run_dir / METRICS_FILE, trainer.step)
        _write_config(trainer)
        write_status(run_dir, RunState.RUNNING, step=trainer.step, resumed_from=trainer.step if resumed else None,
                     **({"resume_notes": notes} if notes else {}))
    started = trainer.first_started
    metrics = MetricsWriter(run_dir / METRICS_FILE) if trainer.is_writer else None
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
                        return _finish(run_dir, RunState.FAILED, reason, trainer, started)
                    step = trainer.step
                    if metrics and (step % config.log_every == 0 or step == trainer.iterations):
                        metrics.write(
                            {
                                "kind": "train",
                                "step": step,
                                "images_seen": step * config.batch_size,
                                "train_flops": trainer.train_flops(step),
                                "loss": loss,
                                "wall_s": trainer.wall_s(),
                            }
                        )
                    if step in trainer.eval_steps:
                        rows = run_evals(trainer)
                        if metrics:
                            for row in rows:
                                metrics.write(row)
                        stop_search = trainer.is_writer and on_eval is not None and bool(on_eval(rows))
                        if any_rank(stop_search, trainer.world, trainer.device):
                            trainer.save()
                            trainer.save_final()
                            return _finish(
                                run_dir, RunState.PRUNED, f"stopped by the search at step {step}", trainer, started
                            )
                    if config.phema_every and step % config.phema_every == 0:
                        trainer.save_phema_snapshots()
                    if step % config.ckpt_every == 0:
                        trainer.save()
                code = max_over_ranks(STOP_CODES[stop.requested], trainer.world, trainer.device)
                if code:
                    # every rank stops at the same step if any rank got the signal
                    signal_name = next(name for name, value in STOP_CODES.items() if value == code)
                    trainer.save()
                    if trainer.is_writer:
                        write_status(run_dir, RunState.INTERRUPTED, step=trainer.step, signal=signal_name)
                    if trainer.world > 1:
                        barrier()  # the checkpoint is complete before any rank leaves
                        print(f"cmscale: rank {trainer.rank}/{trainer.world} stopped at step {trainer.step} "
                              f"on {signal_name}", file=sys.stderr, flush=True)
                        if signal_name == "SIGUSR2" and trainer.is_writer and callable(stop.requeue_handler):
                            stop.requeue_handler(signal.SIGUSR2, None)  # submitit: checkpoint, requeue, exit
                    return {
                        DONE_STATE_KEY: RunState.INTERRUPTED,
                        "reason": f"signal {signal_name}",
                        "final_step": trainer.step,
                    }
            trainer.save()
            trainer.save_final()
            return _finish(run_dir, RunState.DONE, None, trainer, started)
    finally:
        if metrics:
            metrics.close()


def run_evals(trainer: Trainer) -> list[dict[str, Any]]:
    """FID of the EMA model at this step for each sampler step count (see cmscale.eval)."""
    if not trainer.is_writer or not trainer.config.eval.at_fractions:
        return []
    from cmscale.eval import evaluate_model

    ema = trainer.emas[0] if trainer.emas else trainer.method.model
    return evaluate_model(
        trainer.config,
        ema,
        step=trainer.step,
        train_flops=trainer.train_flops(trainer.step),
        images_seen=trainer.step * trainer.config.batch_size,
        run_dir=trainer.run_dir,
        device=trainer.device,
    )


class TrainJob(submitit.helpers.Checkpointable):
    """The callable that submitit runs: ``TrainJob()(config_dict, run_dir, iterations)``.

    On USR2 (timeout or preemption) submitit calls :meth:`checkpoint` between steps (signals are
    deferred to step boundaries), which saves the live state; the requeued job resumes from the
    newest checkpoint on disk, never from state pickled at submission.
    """

    def __call__(self, config_dict: dict[str, Any], run_dir: str, iterations: int | None = None) -> dict[str, Any]:
        try:
            config = RunConfig.model_validate(config_dict)
        except ValidationError as error:
            reason = format_validation_error("start-up failed: the run's config", error)
            record_failure(Path(run_dir), reason, "start-up")
            raise
        return train(config, Path(run_dir), iterations=iterations, record_failures=True)

    def checkpoint(self, config_dict: dict[str, Any], run_dir: str,
                   iterations: int | None = None) -> submitit.helpers.DelayedSubmission:
        trainer = save_active_run()
        if trainer is not None and trainer.is_writer:
            write_status(Path(run_dir), RunState.REQUEUED, step=trainer.step)
        return submitit.helpers.DelayedSubmission(TrainJob(), config_dict, run_dir, iterations)


class PackJob(submitit.helpers.Checkpointable):
    """Several runs in one job, one after the other in one process: ``PackJob()(runs)`` with
    ``runs`` a list of ``(config_dict, run_dir, iterations)``, as :class:`TrainJob` takes them.

    Short runs then share one interpreter start (torch alone takes seconds to import) and one array
    task. Each run keeps its own folder, heartbeat, checkpoints and status. A run that is done is
    skipped (``train`` returns its done.json), so a requeued pack resumes where it stopped. A run
    that raises is recorded as failed in its done.json and the pack goes on; a run stopped by a
    signal ends the pack (its job is being requeued or cancelled).
    """

    def __call__(self, runs: list[tuple[dict[str, Any], str, int | None]]) -> list[dict[str, Any]]:
        results = []
        for config_dict, run_dir, iterations in runs:
            try:
                result = TrainJob()(config_dict, run_dir, iterations)
            except Exception as error:  # noqa: BLE001 - one bad run must not take its pack down
                result = _record_failure(Path(run_dir), error)
            results.append(result)
            if result.get(DONE_STATE_KEY) == RunState.INTERRUPTED:
                break
        return results

    def checkpoint(self, runs: list[tuple[dict[str, Any], str, int | None]]) -> submitit.helpers.DelayedSubmission:
        trainer = save_active_run()
        if trainer is not None and trainer.is_writer:
            write_status(trainer.run_dir, RunState.REQUEUED, step=trainer.step)
        return submitit.helpers.DelayedSubmission(PackJob(), runs)


def _record_failure(run_dir: Path, error: Exception) -> dict[str, Any]:
    """done.json for a packed run that raised (a lone run's job fails instead, and status says so)."""
    done = {
        DONE_STATE_KEY: RunState.FAILED,
        "reason": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(limit=20),
        "finished": time.time(),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_json(run_dir / DONE_FILE, done)
        write_status(run_dir, RunState.FAILED)
    return done
