"""Training methods as a table of recipes: what EDM, ECT, sCT and sCD each need, declared once.

A :class:`Recipe` names everything that differs between methods: the config table of its
hyperparameters (and so its sigma_data), the preconditioner that wraps the network, the loss, how
it uses an EDM teacher, the keyword of its time draw, its sampler and the config field of its
sampler step counts, the conventions its numbers follow, and the two facts FLOP accounting needs
(whether a step's cost depends on the training stage, and whether a learned loss weight is
trained alongside). :data:`RECIPES` is the table; nothing outside it branches on a method's name.

:func:`build_method` assembles a :class:`Method` for training (network, wrapper, loss, teacher);
:mod:`cmscale.sampling` rebuilds the wrapped network of a final checkpoint and draws from it.
FLOPs per step and iteration counts are in :mod:`cmscale.accounting`.

Plugging in a network family or class labels: networks are built by :func:`build_network` (from
the preset table) and reached inside any wrapper by :func:`network_of`; :meth:`Method.loss` takes
``labels`` and hands them to the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cmscale.checkpoint import metadata_mismatches
from cmscale.config import RunConfig
from cmscale.models.edm2_loss import EDM2Loss
from cmscale.models.labels import label_vector
from cmscale.models.losses import ECTLoss, EDMLoss, SCMLoss
from cmscale.models.precond import EDMAsTrigFlow, EDMPrecond, TrigFlowPrecond, network_of
from cmscale.models.presets import build_unet
from cmscale.models.samplers import cm_sample_edm, cm_sample_trigflow, ect_times, heun_sample, scm_times


class TeacherCheckpointError(FileNotFoundError):
    """A teacher checkpoint is missing, unreadable, or made for another network; names the file and fix."""


# Checkpoint metadata: the plain keys every cmscale checkpoint (run state, final, imported teacher) carries.
CHECKPOINT_META_KEYS = ("preset", "resolution", "img_channels", "sigma_data", "method", "label_dim")


# ----------------------------------------------------------------------------------------------
# What each method is made of


def ect_stage_length(config: RunConfig, iterations: int) -> int:
    """ECT's stage length in iterations: ``ect.iters_per_stage``, else the run split into ``ect.num_stages``."""
    return config.ect.iters_per_stage or max(1, iterations // config.ect.num_stages)


def _edm_wrap(config: RunConfig, net: nn.Module) -> nn.Module:
    return EDMPrecond(net, config.edm.sigma_data)


def _ect_wrap(config: RunConfig, net: nn.Module) -> nn.Module:
    return EDMPrecond(net, config.ect.sigma_data, sigma_min=config.ect.sigma_min,
                      boundary_shift=config.ect.boundary_shift)


def _scm_wrap(config: RunConfig, net: nn.Module) -> nn.Module:
    # A network started from an EDM teacher keeps its EDM parametrisation, converted to TrigFlow.
    if config.teacher_ckpt:
        return EDMAsTrigFlow(EDMPrecond(net, config.scm.sigma_data))
    return TrigFlowPrecond(net, config.scm.sigma_data)


def _edm_loss(config: RunConfig, iterations: int) -> EDMLoss | EDM2Loss:  # noqa: ARG001 - one signature for all
    options = config.edm
    # EDM2's networks train with EDM2's loss: weighted by their own learned log-variance head
    loss = EDM2Loss if config.network_preset().architecture == "edm2" else EDMLoss
    return loss(P_mean=options.P_mean, P_std=options.P_std, sigma_data=options.sigma_data)


def ect_loss(config: RunConfig, iterations: int) -> ECTLoss:
    """ECT's loss for a run of ``iterations`` (the stage length follows from it)."""
    options = config.ect
    return ECTLoss(P_mean=options.P_mean, P_std=options.P_std, sigma_data=options.sigma_data, q=options.q,
                   k=options.k, b=options.b, c=options.c, mapping=options.mapping, weighting=options.weighting,
                   iters_per_stage=ect_stage_length(config, iterations))


def _scm_loss(config: RunConfig, iterations: int) -> SCMLoss:  # noqa: ARG001
    options = config.scm
    return SCMLoss(mode=config.method, P_mean=options.P_mean, P_std=options.P_std, sigma_data=options.sigma_data,
                   warmup_iters=options.warmup_iters, tangent_norm_c=options.tangent_norm_c,
                   tangent_norm=options.tangent_norm, sigma_max=options.sigma_max,
                   weight_channels=options.weight_mlp_channels)


def _edm_sample(config, model, shape, steps, generator, device):
    return heun_sample(model, shape, steps, generator=generator, device=device)


def _ect_sample(config, model, shape, steps, generator, device):
    return cm_sample_edm(model, shape, ect_times(steps, config.ect.sigma_max, config.ect.t_mid), generator, device)


def _scm_sample(config, model, shape, steps, generator, device):
    times = scm_times(steps, config.scm.sigma_data, config.scm.sigma_max, config.scm.t_mid)
    return cm_sample_trigflow(model, shape, times, config.scm.sigma_data, generator, device)


def _no_conventions(config: RunConfig, img_channels: int) -> dict:  # noqa: ARG001
    return {}


def _ect_conventions(config: RunConfig, img_channels: int) -> dict:  # noqa: ARG001
    return {"boundary_shift": config.ect.boundary_shift, "boundary_sigma_min": config.ect.sigma_min}


def _scm_conventions(config: RunConfig, img_channels: int) -> dict:
    options = config.scm
    dimension = img_channels * config.resolution**2
    loss = SCMLoss(mode=config.method, tangent_norm_c=options.tangent_norm_c, tangent_norm=options.tangent_norm)
    return {"tangent_norm": options.tangent_norm, "tangent_norm_c": options.tangent_norm_c,
            "tangent_norm_effective_l2_c": loss.effective_l2_c(dimension),
            "loss_dimension_divisor": "D^2" if options.tangent_norm == "fastgen_rms" else "D",
            "dimension": dimension, "jvp": "lean: input tangent only through conv/linear (2 products per layer)"}


TeacherUse = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class Recipe:
    """Everything that differs between training methods (one row of :data:`RECIPES`)."""

    name: str
    options: str  # the RunConfig table of its hyperparameters (and sigma_data): "edm", "ect" or "scm"
    wrap: Callable[[RunConfig, nn.Module], nn.Module]  # the preconditioner around the network
    make_loss: Callable[[RunConfig, int], Any]  # (config, iterations) -> the loss object
    # An EDM teacher: "none"; "optional" (initialises the network when teacher_ckpt is set);
    # "required" (teacher_ckpt must be set: it initialises the network).
    teacher: TeacherUse
    teacher_in_loss: bool  # the loss evaluates the frozen teacher every step (sCD's dx_t/dt)
    time_draw: str  # the loss's keyword for its per-sample time: "sigma" (EDM) or "t"
    sample: Callable[..., tuple[torch.Tensor, int]]  # (config, model, shape, steps, generator, device)
    sampler_steps_field: tuple[str, str]  # (config table, field) of the step counts evaluated
    conventions: Callable[[RunConfig, int], dict]  # recorded in config.json (see method_conventions)
    stage_dependent_cost: bool = False  # a step's FLOPs depend on its stage (ECT's target skips rows with r = 0)
    learned_weight: bool = False  # a learned loss weight is trained with the network (sCM's adaptive weight)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in [
        Recipe("edm", options="edm", wrap=_edm_wrap, make_loss=_edm_loss, teacher="none", teacher_in_loss=False,
               time_draw="sigma", sample=_edm_sample, sampler_steps_field=("edm", "heun_steps"),
               conventions=_no_conventions),
        Recipe("ect", options="ect", wrap=_ect_wrap, make_loss=ect_loss, teacher="required", teacher_in_loss=False,
               time_draw="t", sample=_ect_sample, sampler_steps_field=("eval", "cm_steps"),
               conventions=_ect_conventions, stage_dependent_cost=True),
        Recipe("sct", options="scm", wrap=_scm_wrap, make_loss=_scm_loss, teacher="optional", teacher_in_loss=False,
               time_draw="t", sample=_scm_sample, sampler_steps_field=("eval", "cm_steps"),
               conventions=_scm_conventions, learned_weight=True),
        Recipe("scd", options="scm", wrap=_scm_wrap, make_loss=_scm_loss, teacher="required", teacher_in_loss=True,
               time_draw="t", sample=_scm_sample, sampler_steps_field=("eval", "cm_steps"),
               conventions=_scm_conventions, learned_weight=True),
    ]
}


def recipe_of(config_or_name: RunConfig | str) -> Recipe:
    """The recipe of a config's method (or of a method name)."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.method
    return RECIPES[name]


# ----------------------------------------------------------------------------------------------
# Questions answered from the table


def sigma_data_of(config: RunConfig) -> float:
    """The data standard deviation the run's preconditioner uses."""
    return getattr(config, recipe_of(config).options).sigma_data


def checkpoint_meta(config: RunConfig, img_channels: int) -> dict:
    meta = {"preset": config.preset, "resolution": config.resolution, "img_channels": img_channels,
            "sigma_data": sigma_data_of(config), "method": config.method, "label_dim": config.label_dim}
    if config.architecture is not None:  # a spec-defined model: its checkpoints say what it is
        meta["model_spec"] = config.architecture.model_dump()
    return meta


def uses_teacher(config: RunConfig) -> bool:
    """Whether the run starts from (and, for sCD, consults) an EDM teacher checkpoint."""
    return recipe_of(config).teacher != "none" and bool(config.teacher_ckpt)


def sampler_steps(config: RunConfig) -> list[int]:
    """The sampler step counts a run is evaluated at (Heun steps for EDM, CM steps otherwise)."""
    table, name = recipe_of(config).sampler_steps_field
    return list(getattr(getattr(config, table), name))


def with_sampler_steps(config: RunConfig, steps: list[int]) -> RunConfig:
    """``config`` evaluated at ``steps`` sampler steps instead."""
    table, name = recipe_of(config).sampler_steps_field
    options = getattr(config, table)
    return config.model_copy(update={table: options.model_copy(update={name: list(steps)})})


def method_conventions(config: RunConfig, img_channels: int) -> dict:
    """The conventions behind a run's numbers, recorded in its config.json (``conventions``).

    sCM: which tangent normalisation it used and the c of the plain-L2 form its loss value equals
    (FastGen's default RMS form is L2 with c sqrt(D)); ECT: the boundary shift and when it applied.
    Published numbers name their convention; these make a run comparable with them.
    """
    return recipe_of(config).conventions(config, img_channels)


# ----------------------------------------------------------------------------------------------
# Networks


def build_network(config: RunConfig, img_channels: int, dropout: float | None = None) -> nn.Module:
    """The bare network of ``config.preset`` (the preset table decides its family and size), with
    ``config.label_dim`` classes."""
    return build_unet(config.network_preset(), config.resolution, img_channels,
                      dropout=config.dropout if dropout is None else dropout, label_dim=config.label_dim,
                      dropout_res=config.dropout_res)


class NetworkLogvar(nn.Module):
    """sCM's adaptive weight w(t) from a network's log-variance head (EDM2's u): w(t) = u(ln(sd tan t) / 4).

    The head sits on the EDM noise label, as EDM2 trains it, whatever the wrapper (TrigFlow or EDM)."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net_ref = [net]  # not a submodule: its parameters are the network's, trained and saved with it
        self.sigma_data = sigma_data

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        label = (self.sigma_data * t.reshape(-1).tan()).log() / 4
        return self.net_ref[0].logvar(label)


def wrap_network(config: RunConfig, net: nn.Module) -> nn.Module:
    """The method's preconditioner around ``net`` (see :class:`Recipe`)."""
    return recipe_of(config).wrap(config, net)


def load_network_weights(net: nn.Module, path: str | Path, expected: dict | None = None) -> dict[str, Any]:
    """Load a teacher's network weights, after checking its metadata against ``expected``; returns the
    checkpoint (its metadata for further checks).

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
    return state


def check_teacher_fits(config: RunConfig, payload: dict[str, Any], path: str | Path) -> None:
    """What the teacher's metadata says beyond the network: its data space, and (for a guided sCD teacher)
    whether it trained the unconditional branch that guidance needs."""
    encoder = (payload.get("encoder") or {}).get("class_name")
    if encoder == "StabilityVAEEncoder" and config.vae_path is None:
        raise TeacherCheckpointError(f"teacher checkpoint {path} is a latent-space network (EDM2's "
                                     "StabilityVAEEncoder) but this run trains on pixels; set vae_path and "
                                     "data_path to latents (cmscale data encode), or use a pixel-space teacher")
    if encoder == "StandardRGBEncoder" and config.vae_path is not None:
        raise TeacherCheckpointError(f"teacher checkpoint {path} is a pixel-space network (EDM2's "
                                     "StandardRGBEncoder) but this run trains in a VAE's latent space (vae_path); "
                                     "use a latent-space teacher or leave vae_path unset")
    if config.teacher_guidance != 1 and not payload.get("label_dropout"):
        raise TeacherCheckpointError(f"teacher_guidance {config.teacher_guidance}: teacher checkpoint {path} never "
                                     "trained its unconditional branch (no label_dropout recorded); train the teacher "
                                     "with label_dropout (e.g. 0.1) or set teacher_guidance = 1")


class GuidedTeacher(nn.Module):
    """sCD's teacher at a fixed guidance scale: F = F_u + w (F_c - F_u), F_u with the all-zero label.

    F is affine in the denoiser at fixed (x_t, t), so this is the guided denoiser D_u + w (D_c - D_u)
    in TrigFlow form; the student distils the guided teacher, as sCM does on ImageNet 512."""

    def __init__(self, teacher: nn.Module, guidance: float):
        super().__init__()
        self.teacher = teacher
        self.guidance = guidance
        self.sigma_data = teacher.sigma_data

    def F(self, x_scaled: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        conditional = self.teacher.F(x_scaled, t, class_labels)
        if class_labels is None:
            return conditional
        unconditional = self.teacher.F(x_scaled, t, torch.zeros_like(class_labels))
        return unconditional.lerp(conditional, self.guidance)


# ----------------------------------------------------------------------------------------------
# A method built for training


@dataclass
class Method:
    """A method built for training: the wrapped network, its loss, the teacher and extra modules."""

    recipe: Recipe
    model: nn.Module  # the wrapper that is trained (network_of(model) is the network)
    loss_fn: Any
    teacher: nn.Module | None = None  # the frozen teacher the loss consults (sCD)
    extra_modules: list[nn.Module] = field(default_factory=list)  # trained alongside (sCM's adaptive weight)
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint metadata (CHECKPOINT_META_KEYS)
    conventions: dict[str, Any] = field(default_factory=dict)  # see method_conventions
    label_dim: int = 0  # class-conditional with this many classes (0: unconditional)
    label_dropout: float = 0.0  # probability of a row trained without its label (the unconditional branch)

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def network(self) -> nn.Module:
        return network_of(self.model)

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None = None, **draws: torch.Tensor) -> torch.Tensor:
        """Per-sample losses; ``draws`` (from :meth:`sample_draws`) fix the times and noise, else the loss draws.

        ``labels`` (class labels, one per row, int or one-hot) are handed to the loss as one-hot
        vectors, zeroed on the rows ``draws['label_keep']`` drops (label dropout)."""
        keep = draws.pop("label_keep", None)
        if labels is not None:
            if not self.label_dim:
                raise ValueError("class labels were given, but this run is unconditional (label_dim 0); set "
                                 "label_dim to the data's class count, or train without labels")
            labels = label_vector(labels, self.label_dim, x0.shape[0], x0)
            draws["labels"] = labels if keep is None else labels * keep[:, None].to(labels.dtype)
        if self.teacher is not None:
            draws["teacher"] = self.teacher
        return self.loss_fn(self.model, x0, **draws)

    def sample_draws(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        """The per-sample randomness of one loss on a batch of ``shape`` (times, then noise), from the global RNG.

        Drawn for a whole batch and split by rows, it gives each rank of a data-parallel run exactly
        the times and noise a single process would give the same images."""
        if self.recipe.time_draw == "sigma":
            times = self.loss_fn.sample_sigma(shape[0], device)
        else:
            times = self.loss_fn.sample_t(shape[0], device)
        draws = {self.recipe.time_draw: times, "noise": torch.randn(shape, device=device)}
        if self.label_dropout:  # drawn after the noise, so unconditional runs keep their draws
            draws["label_keep"] = torch.rand(shape[0], device=device) >= self.label_dropout
        return draws

    def set_iteration(self, iteration: int) -> None:
        if hasattr(self.loss_fn, "set_iteration"):
            self.loss_fn.set_iteration(iteration)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        for module in self.extra_modules:
            params += list(module.parameters())
        return params


def build_method(config: RunConfig, img_channels: int, device: torch.device | str = "cpu", load_weights: bool = True,
                 iterations: int | None = None) -> Method:
    """Assemble networks and loss for ``config``; the teacher is loaded from ``config.teacher_ckpt``.

    ``iterations``: the run's iteration count (:func:`cmscale.accounting.iterations_for_budget`),
    which ECT's stage length follows; it defaults to ``budget_iters``. ``load_weights=False`` leaves
    every network randomly initialised (FLOP counting on the meta device, where only shapes matter).
    """
    recipe = recipe_of(config)
    if config.teacher_guidance != 1 and not recipe.teacher_in_loss:
        raise ValueError(f"teacher_guidance {config.teacher_guidance}: method {config.method!r} consults no teacher "
                         "in its loss (sCD does); set teacher_guidance = 1")
    if iterations is None:
        if config.budget_iters is None:
            raise ValueError("build_method needs the run's iterations for a FLOP budget; pass "
                             "iterations=cmscale.accounting.iterations_for_budget(config)")
        iterations = config.budget_iters
    # A teacher is an EDM model of this run's preset, resolution, channels and sigma_data.
    teacher_meta = checkpoint_meta(config, img_channels) | {"method": "edm"}

    def network(dropout: float | None = None) -> nn.Module:
        net = build_network(config, img_channels, dropout)
        if load_weights and uses_teacher(config):
            payload = load_network_weights(net, config.teacher_ckpt, teacher_meta)
            check_teacher_fits(config, payload, config.teacher_ckpt)
        return net

    loss = recipe.make_loss(config, iterations)  # first: sCM's learned weight draws its initial values
    extra_modules = [loss.adaptive_weight.to(device)] if recipe.learned_weight else []
    net = network()
    if recipe.learned_weight and hasattr(net, "logvar"):
        # sCM on EDM2: the adaptive weight is the network's own log-variance head (trained with it)
        loss.adaptive_weight, extra_modules = NetworkLogvar(net, loss.sigma_data), []
    teacher = None
    if recipe.teacher_in_loss:
        teacher_config = config.model_copy(update={"dropout": 0.0})
        teacher = wrap_network(teacher_config, network(dropout=0.0)).to(device).eval().requires_grad_(False)
        if config.teacher_guidance != 1:
            teacher = GuidedTeacher(teacher, config.teacher_guidance)
    return Method(recipe, wrap_network(config, net).to(device), loss, teacher, extra_modules,
                  meta=checkpoint_meta(config, img_channels), conventions=method_conventions(config, img_channels),
                  label_dim=config.label_dim, label_dropout=config.label_dropout)
