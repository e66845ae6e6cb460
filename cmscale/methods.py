"""A training method assembled from a RunConfig: network wrapper, loss, teacher and sampler.

This is the one place that knows how EDM, ECT, sCT and sCD differ: which preconditioner wraps a
method's network (:func:`wrap_network`), how the method is built for training
(:func:`build_method`) or rebuilt from a final checkpoint (:func:`model_from_checkpoint`), how it
samples (:func:`sample`), what one training step costs (:func:`flops_per_step`, with one cache
for every caller) and how many iterations a budget buys (:func:`iterations_for_budget`). The
training loop, the sweep planner and evaluation all go through it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmscale.config import RunConfig, cache_root
from cmscale.data.datasets import dataset_channels
from cmscale.models.losses import ECTLoss, EDMLoss, SCMLoss
from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond, TrigFlowPrecond
from cmscale.models.presets import build_unet
from cmscale.models.samplers import (
    cm_sample_edm,
    cm_sample_trigflow,
    ect_times,
    heun_sample,
    scm_times,
)
from cmscale.models.unet import UNet
from cmscale.rundir import atomic_write_json

FLOPS_CACHE_FILE = "flops_per_step.json"


class TeacherCheckpointError(FileNotFoundError):
    """A teacher checkpoint is missing, unreadable, or made for another network; names the file and fix."""


class BudgetError(ValueError):
    """A compute budget below one training step."""


# Checkpoint metadata: the plain keys every cmscale checkpoint (run state, final, imported teacher) carries.
CHECKPOINT_META_KEYS = ("preset", "resolution", "img_channels", "sigma_data", "method")


def sigma_data_of(config: RunConfig) -> float:
    """The data standard deviation the run's preconditioner uses."""
    if config.method == "edm":
        return config.edm.sigma_data
    if config.method == "ect":
        return config.ect.sigma_data
    return config.scm.sigma_data


def checkpoint_meta(config: RunConfig, img_channels: int) -> dict:
    return {"preset": config.preset, "resolution": config.resolution, "img_channels": img_channels,
            "sigma_data": sigma_data_of(config), "method": config.method}


def metadata_mismatches(stored: dict, expected: dict) -> list[str]:
    """``key: checkpoint has A, the run has B`` for each metadata key present in both that differs."""
    problems = []
    for key, wanted in expected.items():
        if key in stored and stored[key] != wanted:
            problems.append(f"{key}: the checkpoint has {stored[key]!r}, the run has {wanted!r}")
    return problems


@dataclass
class Method:
    """A method built for training: the wrapped network, its loss, the teacher and extra modules."""

    name: str
    model: nn.Module  # the wrapper that is trained (its .net or .edm.net is the UNet)
    loss_fn: object
    teacher: nn.Module | None = None
    extra_modules: list[nn.Module] = field(default_factory=list)  # trained alongside (sCM's adaptive weight)

    def loss(self, x0: torch.Tensor, **draws: torch.Tensor) -> torch.Tensor:
        """Per-sample losses; ``draws`` (from :meth:`sample_draws`) fix the times and noise, else the loss draws."""
        if self.name in ("sct", "scd"):
            return self.loss_fn(self.model, x0, teacher=self.teacher, **draws)
        return self.loss_fn(self.model, x0, **draws)

    def sample_draws(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        """The per-sample randomness of one loss on a batch of ``shape`` (times, then noise), from the global RNG.

        Drawn for a whole batch and split by rows, it gives each rank of a data-parallel run exactly
        the times and noise a single process would give the same images."""
        if self.name == "edm":
            times = {"sigma": self.loss_fn.sample_sigma(shape[0], device)}
        else:
            times = {"t": self.loss_fn.sample_t(shape[0], device)}
        return times | {"noise": torch.randn(shape, device=device)}

    def set_iteration(self, iteration: int) -> None:
        if hasattr(self.loss_fn, "set_iteration"):
            self.loss_fn.set_iteration(iteration)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        for module in self.extra_modules:
            params += list(module.parameters())
        return params


def unet_of(model: nn.Module) -> UNet:
    """The UNet inside any of the wrappers."""
    if isinstance(model, EDMAsTrigFlow):
        return model.edm.net
    return model.net


def wrap_network(config: RunConfig, net: UNet) -> nn.Module:
    """The preconditioner around a method's network (the only place that decides it).

    EDM: the EDM denoiser; ECT: ECT's boundary-exact ECMPrecond; sCT and sCD: TrigFlow, keeping the
    EDM parametrisation (converted) when the network starts from an EDM teacher.
    """
    if config.method == "edm":
        return EDMPrecond(net, config.edm.sigma_data)
    if config.method == "ect":
        return EDMPrecond(net, config.ect.sigma_data, sigma_min=config.ect.sigma_min,
                          boundary_shift=config.ect.boundary_shift)
    if config.teacher_ckpt:
        return EDMAsTrigFlow(EDMPrecond(net, config.scm.sigma_data))
    return TrigFlowPrecond(net, config.scm.sigma_data)


def load_unet_weights(net: UNet, path: str | Path, expected: dict | None = None) -> None:
    """Load a teacher's UNet weights, after checking its metadata against ``expected``.

    ``expected`` holds the run's values of CHECKPOINT_META_KEYS (the teacher's method must be edm);
    a checkpoint without metadata (a bare state dict) is checked by its tensor shapes alone."""
    path = Path(path)
    if not path.is_file():
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} not found; train the EDM teacher first (method = 'edm'; its run writes "
            "ckpt/final.pt) or set teacher_ckpt to an existing file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file (empty, truncated, pickle, garbage) is reported alike
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "it is not a complete cmscale checkpoint: point teacher_ckpt at an EDM run's ckpt/final.pt"
        ) from None
    if not isinstance(state, dict):
        raise TeacherCheckpointError(f"teacher checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    if expected is not None:
        problems = metadata_mismatches(state, expected)
        if problems:
            raise TeacherCheckpointError(f"teacher checkpoint {path} does not fit this run: {'; '.join(problems)}; "
                                         "use a teacher trained with the same preset, resolution and data")
    weights = state["net"] if "net" in state else state
    try:
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:400]
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} does not fit this run's network ({detail}); use a teacher trained with the "
            "same preset, resolution and channels"
        ) from None


def build_method(
    config: RunConfig, img_channels: int, device: torch.device | str = "cpu", load_weights: bool = True
) -> Method:
    """Assemble networks and loss for ``config``; the teacher is loaded from ``config.teacher_ckpt``.

    ``load_weights=False`` leaves every network randomly initialised (FLOP counting on the meta
    device, where only shapes matter).
    """

    def unet(dropout: float = config.dropout) -> UNet:
        return build_unet(config.preset, config.resolution, img_channels, dropout=dropout)

    # A teacher is an EDM model of this run's preset, resolution, channels and sigma_data.
    teacher_meta = checkpoint_meta(config, img_channels) | {"method": "edm"}

    def from_teacher(net: UNet) -> UNet:
        if load_weights:
            load_unet_weights(net, config.teacher_ckpt, teacher_meta)
        return net

    method = config.method
    if method == "edm":
        options = config.edm
        model = wrap_network(config, unet())
        return Method("edm", model.to(device), EDMLoss(options.P_mean, options.P_std, options.sigma_data))
    if method == "ect":
        options = config.ect
        model = wrap_network(config, from_teacher(unet()))
        iters_per_stage = options.iters_per_stage or max(1, iterations_for_budget(config) // options.num_stages)
        loss = ECTLoss(options.P_mean, options.P_std, options.sigma_data, options.q, options.k, options.b,
                       options.c, options.mapping, options.weighting, iters_per_stage)
        return Method("ect", model.to(device), loss)
    options = config.scm
    loss = SCMLoss(method, options.P_mean, options.P_std, options.sigma_data, options.warmup_iters,
                   options.tangent_norm_c, options.tangent_norm, options.sigma_max,
                   weight_channels=options.weight_mlp_channels)
    loss.adaptive_weight.to(device)
    net = from_teacher(unet()) if config.teacher_ckpt else unet()
    teacher = None
    if method == "scd":
        teacher_config = config.model_copy(update={"dropout": 0.0})
        teacher = wrap_network(teacher_config, from_teacher(unet(dropout=0.0)))
        teacher = teacher.to(device).eval().requires_grad_(False)
    return Method(method, wrap_network(config, net).to(device), loss, teacher, [loss.adaptive_weight])


def model_from_checkpoint(config: RunConfig, payload: dict[str, Any], device: torch.device | str) -> nn.Module:
    """The network of a final checkpoint (``ckpt/final.pt``'s payload) in the method's wrapper, frozen."""
    net = build_unet(payload.get("preset", config.preset), payload.get("resolution", config.resolution),
                     payload["img_channels"])
    net.load_state_dict(payload["net"])
    return wrap_network(config, net).to(device).eval().requires_grad_(False)


def sample(config: RunConfig, model: nn.Module, shape: tuple[int, ...], steps: int, generator: torch.Generator,
           device: torch.device | str) -> tuple[torch.Tensor, int]:
    """Draw images with the method's sampler: Heun for EDM teachers, n-step CM sampling otherwise."""
    if config.method == "edm":
        return heun_sample(model, shape, steps, generator=generator, device=device)
    if config.method == "ect":
        return cm_sample_edm(model, shape, ect_times(steps, config.ect.sigma_max, config.ect.t_mid), generator, device)
    times = scm_times(steps, config.scm.sigma_data, config.scm.sigma_max, config.scm.t_mid)
    return cm_sample_trigflow(model, shape, times, config.scm.sigma_data, generator, device)


def sampler_steps(config: RunConfig) -> list[int]:
    return list(config.edm.heun_steps) if config.method == "edm" else list(config.eval.cm_steps)


def method_conventions(config: RunConfig, img_channels: int) -> dict:
    """The conventions behind a run's numbers, recorded in its config.json (``conventions``).

    sCM: which tangent normalisation it used and the c of the plain-L2 form its loss value equals
    (FastGen's default RMS form is L2 with c sqrt(D)); ECT: the boundary shift and when it applied.
    Published numbers name their convention; these make a run comparable with them.
    """
    if config.method in ("sct", "scd"):
        options = config.scm
        dimension = img_channels * config.resolution**2
        loss = SCMLoss(config.method, tangent_norm_c=options.tangent_norm_c, tangent_norm=options.tangent_norm)
        return {"tangent_norm": options.tangent_norm, "tangent_norm_c": options.tangent_norm_c,
                "tangent_norm_effective_l2_c": loss.effective_l2_c(dimension),
                "loss_dimension_divisor": "D^2" if options.tangent_norm == "fastgen_rms" else "D",
                "dimension": dimension, "jvp": "lean: input tangent only through conv/linear (2 products per layer)"}
    if config.method == "ect":
        return {"boundary_shift": config.ect.boundary_shift, "boundary_sigma_min": config.ect.sigma_min}
    return {}


# ----------------------------------------------------------------------------------------------
# FLOPs per step and iterations


def count_flops_per_step(config: RunConfig) -> int:
    """FLOPs of one training step at ``config.batch_size``, counted with FlopCounterMode.

    Counts forward and backward of the online network plus every extra pass the method makes:
    sCT's JVP, sCD's teacher forward and JVP, and ECT's no-grad target forward, which runs only on
    the rows with r > 0, so an ECT step's cost depends on its stage: for ECT this is the
    run-average (the run's expected FLOPs, summed stage by stage, over its iterations; see
    :func:`ect_train_flops`). Counting runs on the meta device (shapes only) with a randomly
    initialised teacher, since only shapes matter.
    """
    from cmscale.models.flops import count_flops

    if config.method == "ect":  # the target's rows depend on the draw: count the parts, average over the run
        return ect_average_step_flops(config, count_ect_step_parts(config))
    img_channels = dataset_channels(config.dataset)
    counting_config = config.model_copy(update={"budget_iters": 1, "budget_flops": None})
    with torch.device("meta"):
        method = build_method(counting_config, img_channels, device="meta", load_weights=False)
        x0 = torch.zeros(config.batch_size, img_channels, config.resolution, config.resolution)
    method.set_iteration(10**9)  # full tangent warm-up: the step's cost does not depend on it

    def one_step() -> None:
        method.loss(x0).mean().backward()

    return count_flops(one_step)


def _counting_code_fingerprint() -> str:
    """Hash of the code that decides FLOPs per step (methods, models) and the torch version.

    Counts cached on disk under an older fingerprint are never used, so editing a model or a
    loss can never leave a stale count behind.
    """
    from importlib.metadata import version

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256(version("torch").encode())
    for path in sorted([package / "methods.py", *(package / "models").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


class FlopsCache:
    """FLOPs per step per shape, in memory and (for the real counter) in ``<cache root>/flops_per_step.json``.

    Counting one shape traces a training step (seconds on a busy CPU); a sweep has few shapes and
    many runs, so each shape is counted once per code version. The planner and the trainer share
    the process-wide cache (:func:`flops_per_step`), so they can never disagree; a custom
    ``counter`` (tests, benchmarks) keeps its counts in memory only.
    """

    def __init__(self, counter: Callable[[RunConfig], int] | None = None, path: Path | None = None):
        self.counter = counter or count_flops_per_step
        self.path = path if counter is not None else (path or cache_root(create=False) / FLOPS_CACHE_FILE)
        self.fingerprint = _counting_code_fingerprint() if self.path else ""
        self.counts: dict[str, int] = {}
        self._disk_loaded = False

    @staticmethod
    def key(config: RunConfig) -> str:
        """Every setting that changes a step's cost: method, preset, shape, batch, dropout, sCM's weight MLP."""
        weight_mlp = config.scm.weight_mlp_channels if config.method in ("sct", "scd") else 0
        return (f"{config.method}/{config.preset}/{config.resolution}x{dataset_channels(config.dataset)}"
                f"/b{config.batch_size}/d{config.dropout}/w{weight_mlp}")

    def _load_disk(self) -> None:
        self._disk_loaded = True
        if not self.path:
            return
        try:
            stored = json.loads(Path(self.path).read_text())
            if stored.get("fingerprint") == self.fingerprint:
                self.counts = {key: int(value) for key, value in stored["counts"].items()} | self.counts
        except (OSError, ValueError, KeyError, AttributeError):
            pass

    def ect_parts(self, config: RunConfig) -> tuple[int, int]:
        """ECT's (online forward + backward, full-batch target forward), cached per shape.

        A custom ``counter`` is taken as the whole step's cost, with no separate target part.
        """
        names = [f"{self.key(config)}/{part}" for part in ("online", "target")]
        if any(name not in self.counts for name in names) and not self._disk_loaded:
            self._load_disk()
        if any(name not in self.counts for name in names):
            real = self.counter is count_flops_per_step
            parts = count_ect_step_parts(config) if real else (int(self.counter(config)), 0)
            self.counts.update(zip(names, parts))
            self._save()
        return self.counts[names[0]], self.counts[names[1]]

    def __call__(self, config: RunConfig) -> int:
        if config.method == "ect":  # its cost depends on the stage schedule, hence on the budget
            return ect_average_step_flops(config, self.ect_parts(config))
        key = self.key(config)
        if key not in self.counts and not self._disk_loaded:
            self._load_disk()
        if key not in self.counts:
            self.counts[key] = int(self.counter(config))
            self._save()
        return self.counts[key]

    def _save(self) -> None:
        if not self.path:
            return
        try:
            atomic_write_json(Path(self.path), {"fingerprint": self.fingerprint, "counts": self.counts})
        except OSError:
            pass  # a read-only cache only costs time


_SHARED_CACHE: FlopsCache | None = None


def _shared_cache() -> FlopsCache:
    global _SHARED_CACHE
    if _SHARED_CACHE is None:
        _SHARED_CACHE = FlopsCache()
    return _SHARED_CACHE


def flops_per_step(config: RunConfig) -> int:
    """FLOPs of one training step of ``config`` (see :func:`count_flops_per_step`), from the shared cache."""
    return _shared_cache()(config)


def _cache_of(flops: Callable[[RunConfig], int]) -> FlopsCache:
    if isinstance(flops, FlopsCache):
        return flops
    return _shared_cache() if flops is flops_per_step else FlopsCache(flops)


def iterations_for_budget(config: RunConfig, flops: Callable[[RunConfig], int] = flops_per_step) -> int:
    """The run's iteration count: ``budget_iters``, or the FLOP budget over the FLOPs of one step,
    rounded to the nearest whole step (so iterations x FLOPs per step is within half a step of it).
    ECT: the count whose stage-by-stage expected FLOPs are nearest the budget (:func:`ect_iterations`)."""
    if config.budget_iters is not None:
        return config.budget_iters
    if config.method == "ect":
        parts = _cache_of(flops).ect_parts(config)
        # the cheapest step (stage 0: online pass and the fewest target rows) must fit in the budget
        check_budget_covers_a_step(config.budget_flops, round(ect_train_flops(config, 1, 1, parts)), "budget_flops")
        return ect_iterations(config, parts)
    step_flops = flops(config)
    check_budget_covers_a_step(config.budget_flops, step_flops, "budget_flops")
    return max(1, round(config.budget_flops / step_flops))


def train_flops_at(config: RunConfig, step: int) -> int:
    """Counted training FLOPs after ``step`` steps (ECT: each step's expected cost at its stage, summed)."""
    if config.method == "ect":
        parts = _shared_cache().ect_parts(config)
        return round(ect_train_flops(config, step, ect_iterations(config, parts), parts))
    return step * flops_per_step(config)


# ----------------------------------------------------------------------------------------------
# ECT: a step's cost depends on its stage


def count_ect_step_parts(config: RunConfig) -> tuple[int, int]:
    """(online forward + backward, no-grad target forward over the whole batch), counted on the meta device.

    An ECT step at stage s costs ``online + P(r > 0 | s) * target`` in expectation: the target runs
    on the rows with r > 0 only, and the FLOPs of these networks are linear in the number of rows.
    """
    from cmscale.models.flops import count_flops

    img_channels = dataset_channels(config.dataset)
    with torch.device("meta"):
        model = wrap_network(config, build_unet(config.preset, config.resolution, img_channels, dropout=config.dropout))
        x = torch.zeros(config.batch_size, img_channels, config.resolution, config.resolution)
        sigma = torch.ones(config.batch_size)
    online = count_flops(lambda: model(x, sigma).sum().backward())
    with torch.no_grad():
        target = count_flops(lambda: model(x, sigma))
    return online, target


def ect_step_parts(config: RunConfig) -> tuple[int, int]:
    """:func:`count_ect_step_parts` through the shared cache."""
    return _shared_cache().ect_parts(config)


def _ect_stage_length(config: RunConfig, iterations: int) -> int:
    return config.ect.iters_per_stage or max(1, iterations // config.ect.num_stages)


def ect_train_flops(config: RunConfig, steps: int, iterations: int, parts: tuple[int, int]) -> float:
    """Expected FLOPs of the first ``steps`` ECT steps of a run of ``iterations``, stage by stage (exact sum)."""
    online, target = parts
    options = config.ect
    loss = ECTLoss(options.P_mean, options.P_std, options.sigma_data, options.q, options.k, options.b,
                   options.c, options.mapping, options.weighting)
    length = _ect_stage_length(config, iterations)
    total, stage = 0.0, 0
    while stage * length < steps:
        in_stage = min(steps, (stage + 1) * length) - stage * length
        total += in_stage * (online + loss.target_row_fraction(stage) * target)
        stage += 1
    return total


def ect_iterations(config: RunConfig, parts: tuple[int, int]) -> int:
    """Iterations whose expected ECT FLOPs are nearest ``budget_flops`` (within half a step)."""
    if config.budget_iters is not None:
        return config.budget_iters
    budget = config.budget_flops

    def cost(n: int) -> float:
        return ect_train_flops(config, n, n, parts)

    low, high = 1, max(2, int(budget / parts[0]) + 1)  # every step costs at least the online pass
    while low < high:  # the largest n with cost(n) <= budget (cost grows with n)
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return min(range(max(1, low - 1), low + 3), key=lambda n: abs(cost(n) - budget))


def ect_average_step_flops(config: RunConfig, parts: tuple[int, int]) -> int:
    """ECT's run-average FLOPs per step: the run's expected FLOPs over its iterations."""
    iterations = ect_iterations(config, parts)
    return max(1, round(ect_train_flops(config, iterations, iterations, parts) / iterations))


def check_budget_covers_a_step(budget_flops: float, step_flops: int, field: str) -> None:
    """A budget below one step would be clamped to one step, training on more compute than asked."""
    if budget_flops < step_flops:
        raise BudgetError(f"{field} = {budget_flops:.4g} is below one training step ({step_flops:.4g} FLOPs per step "
                          f"at this preset, resolution and batch size); give at least {step_flops:.4g}")
