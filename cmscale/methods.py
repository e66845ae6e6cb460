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
    pass


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


def load_unet_weights(net: UNet, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} not found; train the EDM teacher first (method = 'edm'; its run writes "
            "ckpt/final.pt) or set teacher_ckpt to an existing file"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state["net"] if "net" in state else state)


def build_method(config: RunConfig, img_channels: int, device: torch.device | str = "cpu") -> Method:
    """Assemble networks and loss for ``config``; the teacher is loaded from ``config.teacher_ckpt``."""
    def fresh_unet() -> UNet:
        return build_unet(config.preset, config.resolution, img_channels, dropout=config.dropout)

    method = config.method
    if method == "edm":
        options = config.edm
        model = EDMPrecond(fresh_unet(), options.sigma_data)
        return Method("edm", model.to(device), EDMLoss(options.P_mean, options.P_std, options.sigma_data))
    if method == "ect":
        options = config.ect
        net = fresh_unet()
        load_unet_weights(net, config.teacher_ckpt)
        model = EDMPrecond(net, options.sigma_data, sigma_min=options.sigma_min, boundary_shift=options.boundary_shift)
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
        load_unet_weights(net, config.teacher_ckpt)
        model: nn.Module = EDMAsTrigFlow(EDMPrecond(net, options.sigma_data))
    else:
        model = TrigFlowPrecond(fresh_unet(), options.sigma_data)
    if method == "scd":
        teacher_net = build_unet(config.preset, config.resolution, img_channels)
        load_unet_weights(teacher_net, config.teacher_ckpt)
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
        return Method("ect", EDMPrecond(net, sigma_min=config.ect.sigma_min, boundary_shift=config.ect.boundary_shift),
                      ECTLoss())
    loss = SCMLoss(config.method, warmup_iters=0, weight_channels=config.scm.weight_mlp_channels)
    teacher = EDMAsTrigFlow(EDMPrecond(build_unet(config.preset, config.resolution, img_channels))) if config.method == "scd" else None
    return Method(config.method, EDMAsTrigFlow(EDMPrecond(net)), loss, teacher, [loss.adaptive_weight])


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
                "loss_dimension_divisor": "D^2" if options.tangent_norm == "fastgen_rms" else "D", "dimension": dimension,
                "jvp": "input tangent only through conv/linear (2 products per layer)"}
    if config.method == "ect":
        return {"boundary_shift": config.ect.boundary_shift, "boundary_sigma_min": config.ect.sigma_min}
    return {}


def iterations_for_budget(config: RunConfig) -> int:
    if config.budget_iters is not None:
        return config.budget_iters
    return max(1, round(config.budget_flops / flops_per_step(config)))
