"""A training method assembled from a RunConfig: network wrapper, loss, teacher and sampler.

``build_method`` is the one place that knows how EDM, ECT, sCT and sCD differ; the training loop,
FLOP counting and evaluation all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cmscale.config import RunConfig
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
    name: str
    model: nn.Module  # the wrapper that is trained (its .net or .edm.net is the UNet)
    loss_fn: object
    teacher: nn.Module | None = None
    extra_modules: list[nn.Module] = field(default_factory=list)  # trained alongside (sCM's adaptive weight)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        if self.name in ("sct", "scd"):
            return self.loss_fn(self.model, x0, teacher=self.teacher)
        return self.loss_fn(self.model, x0)

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


def build_method(config: RunConfig, img_channels: int, device: torch.device | str = "cpu") -> Method:
    """Assemble networks and loss for ``config``; the teacher is loaded from ``config.teacher_ckpt``."""
    def fresh_unet() -> UNet:
        return build_unet(config.preset, config.resolution, img_channels, dropout=config.dropout)

    teacher_meta = checkpoint_meta(config, img_channels) | {"method": "edm"}

    method = config.method
    if method == "edm":
        options = config.edm
        model = EDMPrecond(fresh_unet(), options.sigma_data)
        return Method("edm", model.to(device), EDMLoss(options.P_mean, options.P_std, options.sigma_data))
    if method == "ect":
        options = config.ect
        net = fresh_unet()
        load_unet_weights(net, config.teacher_ckpt, teacher_meta)
        model = EDMPrecond(net, options.sigma_data, sigma_min=options.sigma_min)
        iters_per_stage = options.iters_per_stage or max(1, iterations_for_budget(config) // options.num_stages)
        loss = ECTLoss(options.P_mean, options.P_std, options.sigma_data, options.q, options.k, options.b,
                       options.c, options.mapping, options.weighting, iters_per_stage)
        return Method("ect", model.to(device), loss)
    options = config.scm
    loss = SCMLoss(method, options.P_mean, options.P_std, options.sigma_data, options.warmup_iters,
                   options.tangent_norm_c, options.tangent_norm, options.sigma_max, weight_channels=options.weight_mlp_channels)
    loss.adaptive_weight.to(device)
    teacher = None
    if config.teacher_ckpt:
        net = fresh_unet()
        load_unet_weights(net, config.teacher_ckpt, teacher_meta)
        model: nn.Module = EDMAsTrigFlow(EDMPrecond(net, options.sigma_data))
    else:
        model = TrigFlowPrecond(fresh_unet(), options.sigma_data)
    if method == "scd":
        teacher_net = build_unet(config.preset, config.resolution, img_channels)
        load_unet_weights(teacher_net, config.teacher_ckpt, teacher_meta)
        teacher = EDMAsTrigFlow(EDMPrecond(teacher_net, options.sigma_data)).to(device).eval().requires_grad_(False)
    return Method(method, model.to(device), loss, teacher, [loss.adaptive_weight])


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


_FLOPS_CACHE: dict[tuple, int] = {}


def flops_per_step(config: RunConfig) -> int:
    """FLOPs of one training step at ``config.batch_size``, counted with FlopCounterMode.

    Counts forward and backward of the online network plus every extra pass the method makes:
    ECT's no-grad target forward, sCT's JVP, sCD's teacher forward and JVP. Counting runs on the
    meta device (shapes only) with a randomly initialised teacher, since only shapes matter.
    """
    from cmscale.data.datasets import DATASETS  # noqa: F401  (keeps dataset names in one place)
    from cmscale.models.flops import count_flops

    img_channels = 1 if config.dataset == "digits" else 3
    key = (config.method, config.preset, config.resolution, img_channels, config.batch_size, config.dropout)
    if key in _FLOPS_CACHE:
        return _FLOPS_CACHE[key]
    counting_config = config.model_copy(update={"teacher_ckpt": None, "budget_iters": 1, "budget_flops": None})
    with torch.device("meta"):
        method = _method_without_weights(counting_config, img_channels)
        x0 = torch.zeros(config.batch_size, img_channels, config.resolution, config.resolution)
    method.set_iteration(10**9)  # full tangent warm-up: the step's cost does not depend on it

    def one_step() -> None:
        method.loss(x0).mean().backward()

    flops = count_flops(one_step)
    _FLOPS_CACHE[key] = flops
    return flops


def _method_without_weights(config: RunConfig, img_channels: int) -> Method:
    """Like build_method but with random teacher weights (for counting on the meta device)."""
    net = build_unet(config.preset, config.resolution, img_channels, dropout=config.dropout)
    if config.method == "edm":
        return Method("edm", EDMPrecond(net), EDMLoss())
    if config.method == "ect":
        return Method("ect", EDMPrecond(net, sigma_min=config.ect.sigma_min), ECTLoss())
    loss = SCMLoss(config.method, warmup_iters=0, weight_channels=config.scm.weight_mlp_channels)
    teacher = EDMAsTrigFlow(EDMPrecond(build_unet(config.preset, config.resolution, img_channels))) if config.method == "scd" else None
    return Method(config.method, EDMAsTrigFlow(EDMPrecond(net)), loss, teacher, [loss.adaptive_weight])


def iterations_for_budget(config: RunConfig) -> int:
    if config.budget_iters is not None:
        return config.budget_iters
    step_flops = flops_per_step(config)
    check_budget_covers_a_step(config.budget_flops, step_flops, "budget_flops")
    return max(1, round(config.budget_flops / step_flops))


def check_budget_covers_a_step(budget_flops: float, step_flops: int, field: str) -> None:
    """A budget below one step would be clamped to one step, training on more compute than asked."""
    if budget_flops < step_flops:
        raise BudgetError(f"{field} = {budget_flops:.4g} is below one training step ({step_flops:.4g} FLOPs per step "
                          f"at this preset, resolution and batch size); give at least {step_flops:.4g}")
