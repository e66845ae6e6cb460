"""Typed run configuration, validated once at the edge (TOML file or sweep planner).

A :class:`RunConfig` fully describes one training run. The sweep planner builds these from a
spec; ``cmscale train RUN.toml`` reads one from a file. Interior code receives the validated
object and never re-checks it.

This module is also the one home of what every config reader shares: the TOML reader
(:func:`read_toml`), the error formatter (:func:`format_validation_error`), dotted overrides and
layered merges of settings (:func:`set_dotted`, :func:`apply_overrides`, :func:`merge_settings`),
the resolver of paths written relative to a file (:func:`resolve_path`), and the environment
defaults of the results root and the cache root.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cmscale.models.ema import MAX_SIGMA_REL

MethodName = Literal["edm", "ect", "sct", "scd"]
METHODS: tuple[str, ...] = get_args(MethodName)  # the method list; everything else derives from it
STUDENT_METHODS = ("ect", "scd")  # methods that need a pretrained teacher checkpoint
Dataset = Literal["digits", "cifar10", "imagefolder"]
DATASETS_WITH_FILES = ("cifar10", "imagefolder")  # read from data_path; digits ships with scikit-learn
# Upsampling beyond these only costs memory: digits are 8x8 and CIFAR-10 32x32 at the source, and
# the whole data set is held in memory at the run's resolution (digits at 1024 needed 21 GB).
MAX_RESOLUTION = {"digits": 64, "cifar10": 128, "imagefolder": 512}

SAFE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")  # the whole name: fullmatch
SAFE_NAME_RULE = "letters, digits, '_', '.' and '-' only, not starting with '.', at most 128 characters"


def safe_path_component(value: str) -> str:
    """``value`` if it can be one folder name under the results root, else a ValueError saying why.

    Sweep names, run ids, study and profile names become folders: a '/' or '..' in one would
    write outside the root, so only one plain component is accepted (never '.' or '..')."""
    if not isinstance(value, str) or not SAFE_NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{value!r} is not a safe folder name: use {SAFE_NAME_RULE}")
    return value


SafeName = Annotated[str, AfterValidator(safe_path_component)]


def profile_name_or_file(value: str) -> str:
    """A profile is a safe name (looked up in the profile folders) or a path to a ``.toml`` file."""
    if value.endswith(".toml"):
        return value
    return safe_path_component(value)


ProfileRef = Annotated[str, AfterValidator(profile_name_or_file)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # EMA rates, Adam betas: in [0, 1)
# Integers the results store keeps in 32-bit columns (INTEGER): bounded here, at the edge, so a run
# never trains with a value its row cannot hold.
INT32_LIMIT = 2**31
Seed = Annotated[int, Field(ge=0, lt=INT32_LIMIT, description="in [0, 2**31)")]
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"

RESULTS_ENV = "CMSCALE_RESULTS"
DEFAULT_RESULTS_ROOT = "results"
CACHE_ENV = "CMSCALE_CACHE_DIR"


def default_results_root() -> Path:
    """``$CMSCALE_RESULTS``, else ``results`` (relative to the working directory)."""
    return Path(os.environ.get(RESULTS_ENV, DEFAULT_RESULTS_ROOT))


def cache_root(create: bool = True) -> Path:
    """``$CMSCALE_CACHE_DIR`` or ``~/.cache/cmscale``: extractor weights, FID statistics, FLOP counts."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cmscale").expanduser()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


class StrictModel(BaseModel):
    # NaN and inf are refused on every float field: a budget or a rate of inf is never meant.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class EDMOptions(StrictModel):
    """EDM diffusion pretraining (Karras et al. 2022): ln(sigma) ~ N(P_mean, P_std^2)."""

    P_mean: float = -1.2
    P_std: float = Field(1.2, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    heun_steps: list[int] = Field(default_factory=lambda: [18], description="Heun steps for teacher evals.")


class ECTOptions(StrictModel):
    """ECT (Geng et al. 2024) defaults from locuslab/ect, CIFAR-10 setting."""

    P_mean: float = -1.1
    P_std: float = Field(2.0, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    q: float = Field(2.0, gt=1)
    k: float = Field(8.0, ge=0)
    b: float = Field(1.0, ge=0)
    c: float = Field(0.0, ge=0, description="pseudo-Huber constant; 0 gives the plain L2 distance")
    mapping: Literal["sigmoid", "const"] = "sigmoid"
    weighting: Literal["inv_dt", "snr", "snrpk"] = Field(
        "inv_dt", description="w(t, r): 1/(t - r) ('inv_dt', CIFAR-10), or (t^2 + sd^2)/(t sd)^2 = 1/t^2 + 1/sd^2 "
        "('snrpk', locuslab/ect's ImageNet-64 branch; 'snr' is the same formula)")
    num_stages: int = Field(8, ge=1, description="stages over the run; the stage length is budget_iters / num_stages")
    iters_per_stage: int | None = Field(
        None, ge=1, description="fixed stage length in iterations; overrides num_stages"
    )
    sigma_min: float = Field(
        0.003, ge=0, description="boundary shift of ECMPrecond's c_skip/c_out (locuslab/ect: 0.003)"
    )
    boundary_shift: Literal["eval", "always", "off"] = Field(
        "eval", description="when the sigma_min shift applies: 'eval' (official ECMPrecond: EMA sampling and FID only; "
        "training uses the plain EDM c_skip/c_out), 'always', or 'off'"
    )
    sigma_max: float = Field(80.0, gt=0)
    t_mid: float = Field(0.821, gt=0, description="intermediate sigma for 2-step sampling")


class SCMOptions(StrictModel):
    """sCM (Lu & Song 2024): TrigFlow, tan(t) = exp(tau)/sigma_data with tau ~ N(P_mean, P_std^2)."""

    P_mean: float = -1.0
    P_std: float = Field(1.4, gt=0)
    sigma_data: float = Field(0.5, gt=0)
    warmup_iters: int = Field(10_000, ge=0, description="tangent warm-up: r = min(1, step / warmup_iters)")
    tangent_norm_c: float = Field(0.1, gt=0)
    tangent_norm: Literal["l2", "rms", "fastgen_rms"] = Field(
        "l2", description="g / (||g|| + c) and one 1/D ('l2', FastGen with its two flags off); g / (RMS(g) + c) and "
        "one 1/D ('rms'); g / (RMS(g) + c) and a second 1/D ('fastgen_rms', FastGen's default: the l2 loss value "
        "with an effective c of c sqrt(D))")
    weight_mlp_channels: int = Field(128, ge=1, description="positional channels of the learned log-variance head")
    t_mid: float = Field(1.1, gt=0, lt=1.5708, description="intermediate TrigFlow time for 2-step sampling")
    sigma_max: float = Field(80.0, gt=0)


class EvalConfig(StrictModel):
    at_fractions: list[float] = Field(
        default_factory=lambda: [1.0], description="fractions of the budget at which to evaluate FID"
    )
    cm_steps: list[int] = Field(default_factory=lambda: [1, 2])
    num_samples: int | None = Field(
        None, ge=2, lt=INT32_LIMIT, description="FID/KID samples; None: 50,000 for real data, 1,000 for digits"
    )
    kid_subsets: int = Field(100, ge=0, description="KID random subsets (torch-fidelity's default); 0: no KID")
    batch_size: int = Field(250, ge=1)
    extractor: str = Field(
        "auto", description="'auto' (digits -> domain CNN, else inception-v3-compat) or an extractor name"
    )
    inception_weights: str | None = None
    seed: Seed = 0
    grid_images: int = Field(64, ge=0, le=64)

    @model_validator(mode="after")
    def _fractions_in_range(self) -> EvalConfig:
        bad = [f for f in self.at_fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"at_fractions must lie in (0, 1]; got {bad}")
        return self


class ModelSpec(StrictModel):
    """A network defined by family and size instead of a named preset (a sweep spec's ``[models.NAME]``).

    Unset ``channel_mult`` and ``attn_levels`` take the family's published layout
    (:data:`cmscale.models.presets.FAMILY_LAYOUTS`). ``channels`` may be a list in a spec (one model per width).
    """

    family: Literal["unet", "ddpmpp", "adm", "edm2"]
    channels: int = Field(ge=1, description="base width (model_channels)")
    blocks: int = Field(ge=1, description="residual blocks per resolution level")
    channel_mult: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1)
    attn_levels: list[Annotated[int, Field(ge=0)]] | None = None


class RunConfig(StrictModel):
    """One training run, end to end."""

    method: MethodName
    preset: str
    architecture: ModelSpec | None = Field(None, description="the network by family and width (a spec-defined "
                                           "model, which `preset` then names); None: the preset table's")
    dataset: Dataset = "digits"
    data_path: str | None = Field(None, validate_default=True)
    resolution: int = Field(16, ge=4)
    batch_size: int = Field(64, ge=1, lt=INT32_LIMIT)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "radam"] = "adam"
    adam_betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    lr_warmup_iters: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "inv_sqrt"] = Field(
        "constant", description="after the warm-up: constant, or a cosine decay over the run's iterations to "
        "lr * lr_final_ratio at its last step (each budget of an iso-FLOP sweep then ends annealed, as in "
        "Chinchilla's runs), or EDM2's inverse square root lr / sqrt(max(step / lr_ref_batches, 1))")
    lr_ref_batches: int = Field(70_000, ge=1, description="inv_sqrt schedule: the step where the decay starts "
                                "(EDM2's ref_batches; ECT's ImageNet-64 runs: 2000)")
    lr_final_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule: the last step's lr over lr")
    ema_rates: list[Fraction] = Field(default_factory=lambda: [0.999], description="each in [0, 1)")
    ema_sigma_rels: list[Annotated[float, Field(gt=0, lt=MAX_SIGMA_REL)]] = Field(
        default_factory=list, description="power-function EMAs (EDM2), each of this width relative to the run's "
        f"length, in (0, {MAX_SIGMA_REL:.4f}): one setting fits a 20-step and a 2,000-step run alike. They come "
        "before the ema_rates averages; the first average of all is the one evaluated and exported")
    phema_every: int = Field(0, ge=0, description="post-hoc EMA (EDM2): every this many steps, store a snapshot of "
                             "each ema_sigma_rels average under phema/ (EDM2 uses widths 0.05 and 0.10); "
                             "`cmscale ema reconstruct RUN --sigma-rel ...` then builds any width. 0: off")
    dropout: float = Field(0.0, ge=0, lt=1)
    dropout_res: int | None = Field(None, ge=1, description="EDM2 networks: dropout only in blocks at feature "
                                    "resolutions <= this (ECT's ImageNet-64 runs: 16); None: every block")
    label_dim: int = Field(0, ge=0, description="class-conditional training on the data set's labels: its class "
                           "count (digits and CIFAR-10: 10; an EDM dataset.json: its labels); 0: unconditional")
    label_dropout: float = Field(0.0, ge=0, lt=1, description="probability of training a row without its label "
                                 "(the unconditional branch classifier-free guidance needs)")
    guidance: float = Field(1.0, ge=0, description="guidance scale w of sampling: D = D_u + w (D_c - D_u), with "
                            "D_u the unconditional branch (label_dropout) or, with guide_ckpt, a weaker network "
                            "(EDM2's autoguidance); 1: no guidance")
    teacher_guidance: float = Field(1.0, ge=0, description="sCD: distil the teacher guided at this scale "
                                    "(classifier-free; the teacher must have trained with label_dropout); 1: none")
    guide_ckpt: str | None = Field(None, description="autoguidance: a cmscale checkpoint of a weaker network of the "
                                   "same preset family, resolution and label_dim (e.g. a smaller, shorter run)")
    seed: Seed = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto, cpu, mps, cuda or cuda:N")
    # How the run executes (memory layout, compiler, CUDA matmul precision), kept out of the config hash
    # like `device`, so a run keeps its identity on another machine:
    compile: bool = Field(False, description="wrap the network in torch.compile (pays off on long GPU runs)")
    channels_last: bool = Field(False, description="NHWC memory layout for the network (faster convolutions on CUDA)")
    tf32: bool = Field(True, description="on CUDA, fp32 matmuls and convolutions use TF32 tensor cores")
    tensorboard: bool = Field(False, description="also write TensorBoard event files into the run's tensorboard/ "
                              "folder (needs pip install 'cmscale[tensorboard]')")
    teacher_ckpt: str | None = None
    teacher_run_id: SafeName | None = None
    budget_iters: int | None = Field(None, gt=0, lt=2**63)
    budget_flops: float | None = Field(None, gt=0)
    ckpt_every: int = Field(200, ge=1, description="iterations between periodic checkpoints")
    log_every: int = Field(10, ge=1)
    heartbeat_s: float = Field(10.0, gt=0)
    edm: EDMOptions = Field(default_factory=EDMOptions)
    ect: ECTOptions = Field(default_factory=ECTOptions)
    scm: SCMOptions = Field(default_factory=SCMOptions)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # Latent space (issue 24): data_path then holds EDM2 latents and resolution is the latents' side.
    vae_path: str | None = Field(None, description="local diffusers AutoencoderKL folder: train in its latent "
                                 "space (data_path: latents from `cmscale data encode`) and decode samples for FID")
    fid_reference: str | None = Field(None, description="FID/KID reference: an image folder or zip, or published "
                                      "statistics (EDM/EDM2 fid-refs .pkl/.npz); default: the training images")
    # Filled by the sweep planner; free-form for hand-written runs.
    sweep: SafeName = "adhoc"
    run_id: SafeName | None = None

    @model_validator(mode="after")
    def _check_budget_and_teacher(self) -> RunConfig:
        from cmscale.models.presets import PRESETS

        if self.architecture is None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}, or define the "
                             "model by family and width (a spec's [models.NAME], or architecture)")
        if self.architecture is not None:
            check_levels(self.resolution, self.preset, len(self.network_preset().channel_mult))
        if (self.budget_iters is None) == (self.budget_flops is None):
            raise ValueError("give exactly one of budget_iters or budget_flops")
        if self.method in STUDENT_METHODS and not self.teacher_ckpt:
            raise ValueError(f"method {self.method!r} needs teacher_ckpt (a pretrained EDM checkpoint)")
        family = self.network_preset().architecture
        if self.label_dim and family == "unet":
            raise ValueError(f"label_dim {self.label_dim}: preset {self.preset!r} is cmscale's unconditional UNet; "
                             "use an edm2-*, ddpmpp* or adm preset for class-conditional training, or label_dim = 0")
        if self.dropout_res is not None and family != "edm2":
            raise ValueError(f"dropout_res applies to EDM2 networks; preset {self.preset!r} is {family}: remove "
                             "dropout_res or use an edm2-* preset")
        if self.label_dropout and not self.label_dim:
            raise ValueError("label_dropout drops class labels, but label_dim is 0; set label_dim (the data's class "
                             "count) or label_dropout = 0")
        if self.guidance != 1 and self.guide_ckpt is None and not self.label_dropout:
            raise ValueError(f"guidance {self.guidance} needs an unconditional branch: this run never trains one "
                             "(label_dropout = 0); set label_dropout (e.g. 0.1), give guide_ckpt (autoguidance) "
                             "or guidance = 1")
        if self.teacher_guidance != 1 and not self.label_dim:
            raise ValueError(f"teacher_guidance {self.teacher_guidance} guides sCD's teacher on class labels, but "
                             "label_dim is 0; set label_dim or teacher_guidance = 1")
        if self.phema_every and not self.ema_sigma_rels:
            raise ValueError("phema_every stores snapshots of the power EMAs, but ema_sigma_rels is empty; set "
                             "ema_sigma_rels = [0.05, 0.1] (EDM2's two widths) or phema_every = 0")
        return self

    @field_validator("data_path")
    @classmethod
    def _data_path_for_files(cls, data_path: str | None, info: ValidationInfo) -> str | None:
        # Not checked on disk here: a job may validate its config on a node that mounts the data elsewhere.
        return check_data_path(info.data.get("dataset"), data_path, must_exist=False)

    @field_validator("resolution")
    @classmethod
    def _resolution_fits(cls, resolution: int, info: ValidationInfo) -> int:
        check_resolution(info.data.get("dataset"), resolution, info.data.get("preset"))
        return resolution

    @model_validator(mode="after")
    def _check_latent_space(self) -> RunConfig:
        if self.vae_path is not None and self.dataset != "imagefolder":
            raise ValueError(f"vae_path is set but dataset is {self.dataset!r}: latent runs read latents from an "
                             "image folder or zip (dataset = 'imagefolder', written by `cmscale data encode`)")
        if self.vae_path is not None and self.fid_reference is None:
            raise ValueError("a latent run (vae_path) measures FID in pixel space, but its training data holds "
                             "latents: set fid_reference to the images they were encoded from (folder or zip) or "
                             "to published reference statistics (EDM2's fid-refs img512.pkl)")
        return self

    def network_preset(self):
        """The run's network as a :class:`cmscale.models.presets.Preset`: the spec-defined ``architecture``
        (named ``preset``) or the preset table's entry."""
        from cmscale.models.presets import defined_preset, get_preset

        if self.architecture is None:
            return get_preset(self.preset)
        return defined_preset(self.preset, **self.architecture.model_dump())

    def identity(self) -> dict:
        """The fields that define the run (everything but bookkeeping), for hashing.

        Fields added after run ids were first published are left out while they hold their
        defaults, so adding an option never renames the runs that do not use it."""
        identity = self.model_dump(mode="json", exclude={"run_id", "sweep", *EXECUTION_FIELDS})
        for name, default in LATER_FIELDS.items():
            if identity.get(name) == default:
                identity.pop(name)
        return identity


EXECUTION_FIELDS = {"device", "heartbeat_s", "compile", "channels_last", "tf32", "tensorboard"}
# Options added after the run ids of issue 14, with the default that keeps an id unchanged.
LATER_FIELDS = {"lr_schedule": "constant", "lr_final_ratio": 0.1, "ema_sigma_rels": [], "phema_every": 0,
                "label_dim": 0, "label_dropout": 0.0, "guidance": 1.0, "guide_ckpt": None, "teacher_guidance": 1.0,
                "lr_ref_batches": 70_000,
                "dropout_res": None, "architecture": None}
LATER_FIELDS |= {"vae_path": None, "fid_reference": None}  # issue 24: latent space, published FID references


def check_data_path(dataset: str | None, data_path: str | None, must_exist: bool) -> str | None:
    """``data_path`` if ``dataset`` can be read from it: required for the data sets read from disk, and
    (``must_exist``, as when a sweep is planned) present on this machine."""
    if dataset in DATASETS_WITH_FILES:
        if not data_path:
            raise ValueError(f"dataset {dataset!r} is read from disk; set data_path to its folder or file")
        if must_exist and not Path(data_path).expanduser().exists():
            raise ValueError(f"{data_path} does not exist; give the folder (or file) that holds the {dataset} data")
    return data_path


def check_resolution(dataset: str | None, resolution: int, preset: str | None) -> None:
    """Refuse resolutions above the dataset's bound, or not divisible by the preset's downsampling."""
    from cmscale.models.presets import PRESETS

    bound = MAX_RESOLUTION.get(dataset)
    if bound is not None and resolution > bound:
        raise ValueError(f"resolution {resolution} is above the bound for dataset {dataset!r} ({bound}); "
                         "the data set is "
                         f"held in memory at this resolution. Use resolution <= {bound}")
    if preset in PRESETS:
        check_levels(resolution, preset, len(PRESETS[preset].channel_mult))


def check_levels(resolution: int, preset: str, levels: int) -> None:
    factor = 2 ** (levels - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by {factor}, the downsampling of preset "
                         f"{preset!r} ({levels} levels); use a multiple of {factor}")


class ConfigError(ValueError):
    """A config file failed validation; the message names the file, each field path and the fix."""


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  - {path}: {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def read_toml(path: Path | str, what: str, error: type[ConfigError] = ConfigError) -> dict:
    """The table in a TOML file; a missing file or bad TOML raises ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as decode_error:
        raise error(f"{path}: not valid TOML ({decode_error})") from None
    except UnicodeDecodeError as decode_error:
        raise error(f"{path}: not UTF-8 text (byte {decode_error.start}: {decode_error.reason}); "
                    "TOML files are UTF-8: save it with that encoding") from None


def load_run_config(path: Path | str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run TOML, apply dotted ``overrides`` (``{"ect.q": 4.0}``), validate once.

    Errors name the file (and the overrides, when some were given) and each bad field.
    """
    given = " ".join(f"{key}={value}" for key, value in (overrides or {}).items())
    source = f"{path} (with --set {given})" if overrides else str(path)
    try:
        raw = apply_overrides(read_toml(path, "run config"), overrides or {})
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{source}: invalid configuration\n  - {error}") from None
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None


# ----------------------------------------------------------------------------------------------
# Dotted overrides, layered settings and relative paths (the one implementation of each)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=VALUE`` -> ("a.b", value); VALUE is read as a TOML value, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{text!r} is not KEY=VALUE (e.g. budget_iters=50 or ect.num_stages=2)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``dotted = "a.b"``, creating the tables on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise ValueError(f"{dotted}: {where} is a value ({node!r}), not a table of options; "
                             f"set {where}=VALUE, or name an option table such as ect.q")
    node[leaf] = value


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``tree`` with each dotted setting of ``overrides`` set."""
    merged = copy.deepcopy(tree)
    for dotted, value in overrides.items():
        set_dotted(merged, dotted, value)
    return merged


def merge_settings(*layers: dict[str, Any]) -> dict[str, Any]:
    """Merge layers of settings, later ones winning; option tables (``ect``, ``eval``) merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge_settings(merged[key], value)
            else:
                merged[key] = value
    return merged


def resolve_path(value: str, beside: Path, absolute: bool = False) -> str:
    """A path written in a file: as given when absolute or found from the working directory, else
    beside the file (``beside`` is its folder) when found there. ``absolute`` makes the answer
    absolute, for jobs that may start in another working directory."""
    candidate = Path(value).expanduser()
    if not candidate.is_absolute() and not candidate.exists() and (Path(beside) / candidate).exists():
        return str((Path(beside) / candidate).resolve())
    if absolute and not candidate.is_absolute():
        return str(candidate.resolve())
    return str(candidate) if absolute else value
