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
_ECT_PARTS_CACHE: dict[tuple, tuple[int, int]] = {}


def flops_per_step(config: RunConfig) -> int:
    """FLOPs of one training step at ``config.batch_size``, counted with FlopCounterMode.

    Counts forward and backward of the online network plus every extra pass the method makes:
    sCT's JVP, sCD's teacher forward and JVP, and ECT's no-grad target forward, which runs only
    on the rows with r > 0, so an ECT step's cost depends on its stage. For ECT this returns the
    run-average: the expected FLOPs of the whole run (integrated over its stage schedule, see
    :func:`train_flops_at`) divided by its iterations. Counting runs on the meta device (shapes
    only) with a randomly initialised teacher, since only shapes matter.
    """
    if config.method == "ect":
        iterations = iterations_for_budget(config)
        return max(1, round(train_flops_at(config, iterations) / iterations))
    from cmscale.data.datasets import DATASETS  # noqa: F401  (keeps dataset names in one place)
    from cmscale.models.flops import count_flops

    img_channels = _img_channels(config)
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


def _img_channels(config: RunConfig) -> int:
    return 1 if config.dataset == "digits" else 3


def ect_step_parts(config: RunConfig) -> tuple[int, int]:
    """(online forward + backward, no-grad target forward over the whole batch), counted on the meta device.

    An ECT step at stage s costs ``online + P(r > 0 | s) * target`` in expectation: the target runs
    on the rows with r > 0 only, and the FLOPs of these networks are linear in the number of rows.
    """
    from cmscale.models.flops import count_flops

    img_channels = _img_channels(config)
    key = (config.preset, config.resolution, img_channels, config.batch_size, config.dropout)
    if key not in _ECT_PARTS_CACHE:
        with torch.device("meta"):
            model = EDMPrecond(build_unet(config.preset, config.resolution, img_channels, dropout=config.dropout))
            x = torch.zeros(config.batch_size, img_channels, config.resolution, config.resolution)
            sigma = torch.ones(config.batch_size)
        online = count_flops(lambda: model(x, sigma).sum().backward())
        with torch.no_grad():
            target = count_flops(lambda: model(x, sigma))
        _ECT_PARTS_CACHE[key] = (online, target)
    return _ECT_PARTS_CACHE[key]


def _ect_loss_for_schedule(config: RunConfig) -> ECTLoss:
    options = config.ect
    return ECTLoss(options.P_mean, options.P_std, options.sigma_data, options.q, options.k, options.b,
                   options.c, options.mapping, options.weighting)


def _ect_stage_length(config: RunConfig, iterations: int) -> int:
    return config.ect.iters_per_stage or max(1, iterations // config.ect.num_stages)


def ect_train_flops(config: RunConfig, steps: int, iterations: int, parts: tuple[int, int]) -> float:
    """Expected FLOPs of the first ``steps`` ECT steps of a run of ``iterations``, stage by stage (exact sum)."""
    online, target = parts
    loss = _ect_loss_for_schedule(config)
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


def train_flops_at(config: RunConfig, step: int) -> int:
    """Counted training FLOPs after ``step`` steps (ECT: the expected cost of each step's stage, summed)."""
    if config.method == "ect":
        parts = ect_step_parts(config)
        return round(ect_train_flops(config, step, ect_iterations(config, parts), parts))
    return step * flops_per_step(config)


def _method_without_weights(config: RunConfig, img_channels: int) -> Method:
    """Like build_method but with random teacher weights (for counting on the meta device)."""
    net = build_unet(config.preset, config.resolution, img_channels, dropout=config.dropout)
    if config.method == "edm":
        return Method("edm", EDMPrecond(net), EDMLoss())
    loss = SCMLoss(config.method, warmup_iters=0, weight_channels=config.scm.weight_mlp_channels)
    teacher = EDMAsTrigFlow(EDMPrecond(build_unet(config.preset, config.resolution, img_channels))) if config.method == "scd" else None
    return Method(config.method, EDMAsTrigFlow(EDMPrecond(net)), loss, teacher, [loss.adaptive_weight])


def iterations_for_budget(config: RunConfig) -> int:
    if config.budget_iters is not None:
        return config.budget_iters
    if config.method == "ect":
        return ect_iterations(config, ect_step_parts(config))
    return max(1, round(config.budget_flops / flops_per_step(config)))
