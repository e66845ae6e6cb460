"""Sweep spec: methods x presets x compute budgets x seeds, validated once from TOML.

Example (``examples/sweep_digits_tiny.toml``)::

    name = "digits_tiny"
    dataset = "digits"
    resolution = 16
    presets = ["xxs", "xs"]
    seeds = [0]
    budgets_flops = [2e12, 6e12]          # or: budgets = { start = 1e12, stop = 1e13, num = 3 }

    [defaults]                            # any RunConfig field, for every run
    batch_size = 64

    [methods.ect]                         # per-method RunConfig overrides; options under [methods.ect.ect]
    lr = 5e-4
    [methods.scd]

    [teacher]                             # pretrain one EDM teacher per preset ...
    train = true
    budget_flops = 1e13                   # or budget_iters = 800: every size to the same step count
    # ... or give checkpoints:  [teacher.checkpoints]  xs = "/path/to/teacher_xs.pt"

    [executor]
    name = "local"                        # local | slurm | debug
    profile = "local"                     # slurm/profiles/<profile>.toml (see cmscale.cluster.profiles)
    runs_per_job = 1                      # > 1 packs that many short runs into one job

    [[runs]]                              # optional explicit runs, zipped, besides the grid
    method = "sct"
    preset = "xs"
    budget_flops = 3e12

    [models.w96]                          # a size of the spec's own: family and width (and depth)
    family = "edm2"                       # unet | ddpmpp | adm | edm2 (layout: the family's published one)
    channels = 96                         # a list, e.g. [32, 64, 128], defines w96-c32, w96-c64, ...
    blocks = 3                            # optional: channel_mult = [1, 2], attn_levels = [1]

Every model a spec defines joins the grid's presets; its architecture is part of each run's identity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from cmscale.cluster.executors import ExecutorKind
from cmscale.config import (
    METHODS,
    STUDENT_METHODS,
    ConfigError,
    Dataset,
    MethodName,
    ModelSpec,
    ProfileRef,
    RunConfig,
    SafeName,
    Seed,
    StrictModel,
    apply_overrides,
    check_data_path,
    check_resolution,
    format_validation_error,
    read_toml,
)

# A grid above this many runs is refused before anything is built: planning holds every run's
# config in memory (a million runs took 3 GB and ended in a MemoryError), and no cluster queue takes it.
MAX_PLANNED_RUNS = 100_000
# Fields the spec itself sets for each run (its identity and where it lands): a [defaults],
# [methods.*] or [teacher.overrides] table that set one would move runs to another sweep, or
# silently change the grid's axes.
SPEC_OWNED_FIELDS = ("sweep", "run_id", "method", "preset", "seed", "budget_flops", "budget_iters", "dataset",
                     "data_path", "resolution", "teacher_ckpt", "teacher_run_id")


class LogSpace(StrictModel):
    """Log-spaced budgets: ``num`` values from ``start`` to ``stop`` inclusive."""

    start: float = Field(gt=0)
    stop: float = Field(gt=0)
    num: int = Field(ge=1, le=MAX_PLANNED_RUNS)

    def values(self) -> list[float]:
        if self.num == 1:
            return [self.start]
        step = (math.log(self.stop) - math.log(self.start)) / (self.num - 1)
        return [float(f"{math.exp(math.log(self.start) + i * step):.6g}") for i in range(self.num)]


class TeacherSpec(StrictModel):
    train: bool = False
    budget_flops: float | None = Field(None, gt=0)
    budget_iters: int | None = Field(None, gt=0)
    checkpoints: dict[str, str] = Field(default_factory=dict, description="preset -> EDM checkpoint path")
    overrides: dict[str, Any] = Field(default_factory=dict, description="RunConfig fields for teacher runs")

    @field_validator("checkpoints")
    @classmethod
    def _checkpoints_exist(cls, checkpoints: dict[str, str]) -> dict[str, str]:
        """Checked when planning, so no student is launched to die loading a missing teacher."""
        for preset, path in checkpoints.items():
            if not Path(path).expanduser().is_file():
                raise ValueError(f"{preset} = {path!r}: no such file; give the path of the preset's EDM teacher "
                                 "checkpoint (from `cmscale teacher import`, or an EDM run's ckpt/final.pt)")
        return checkpoints

    @model_validator(mode="after")
    def _budget_when_training(self) -> TeacherSpec:
        if self.train and (self.budget_flops is None) == (self.budget_iters is None):
            raise ValueError("teacher.train = true needs exactly one of teacher.budget_flops or teacher.budget_iters")
        return self


class ExecutorSpec(StrictModel):
    name: ExecutorKind = "local"
    profile: ProfileRef = "local"
    max_parallel: int = Field(2, ge=1, description="local executor: runs at once")
    timeout_min: int = Field(60, ge=1)
    runs_per_job: int = Field(
        1, ge=1, description="runs trained one after the other in one job (one array task, one process): "
        "packing short runs saves the interpreter start of each and cuts the number of array tasks")


class ExplicitRun(StrictModel):
    model_config = StrictModel.model_config | {"extra": "allow"}
    method: MethodName
    preset: str
    budget_flops: float | None = Field(None, gt=0)
    budget_iters: int | None = Field(None, gt=0)
    seed: Seed = 0


class SpecModel(StrictModel):
    """``[models.NAME]``: a network by family and width; ``channels`` a list defines one model per width."""

    family: Literal["unet", "ddpmpp", "adm", "edm2"]
    channels: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=1)]]
    blocks: int = Field(ge=1)
    channel_mult: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1)
    attn_levels: list[Annotated[int, Field(ge=0)]] | None = None

    def expand(self, name: str) -> dict[str, ModelSpec]:
        fields = self.model_dump(exclude={"channels"})
        if isinstance(self.channels, int):
            return {name: ModelSpec(channels=self.channels, **fields)}
        return {f"{name}-c{width}": ModelSpec(channels=width, **fields) for width in self.channels}


class SweepSpec(StrictModel):
    name: SafeName
    dataset: Dataset = "digits"
    data_path: str | None = Field(None, validate_default=True)
    resolution: int = Field(16, ge=4)
    presets: list[str] = Field(default_factory=list)
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    budgets_flops: list[float] = Field(default_factory=list)
    budgets: LogSpace | None = None
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    runs: list[ExplicitRun] = Field(default_factory=list)
    models: dict[SafeName, SpecModel] = Field(default_factory=dict, description="sizes defined by family and width")

    def defined_models(self) -> dict[str, ModelSpec]:
        """The spec's own models by name (a list of widths expanded to one model each)."""
        defined: dict[str, ModelSpec] = {}
        for name, model in self.models.items():
            defined |= model.expand(name)
        return defined

    def grid_presets(self) -> list[str]:
        """The grid's sizes: ``presets`` and then every model the spec defines."""
        return list(dict.fromkeys([*self.presets, *self.defined_models()]))

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = [name for name in methods if name not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; allowed: {', '.join(METHODS)}")
        # The overrides are validated as RunConfig fields when the plan builds each run; NaN and inf
        # are refused here already, as in every typed float, so no spec carrying one is accepted.
        for path, value in _leaves(methods):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"methods.{path} = {value} is not a finite number; give a finite value")
        return methods

    @model_validator(mode="after")
    def _known_presets(self) -> SweepSpec:
        from cmscale.models.presets import PRESETS

        defined = self.defined_models()
        clash = sorted(set(defined) & set(PRESETS))
        if clash:
            raise ValueError(f"models.{clash[0]}: the name is a built-in preset; name the spec's model otherwise")
        named = [("presets", name) for name in self.presets]
        named += [(f"runs[{index}].preset", run.preset) for index, run in enumerate(self.runs)]
        unknown = [(where, name) for where, name in named if name not in PRESETS and name not in defined]
        if unknown:
            where, name = unknown[0]
            raise ValueError(f"{where}: unknown preset {name!r}; allowed: {', '.join(PRESETS)}, or a model the "
                             "spec defines under [models.NAME] (family, channels, blocks)")
        return self

    @field_validator("data_path")
    @classmethod
    def _data_path_exists(cls, data_path: str | None, info: ValidationInfo) -> str | None:
        """Checked when planning, so a sweep never launches runs that die reading their data."""
        return check_data_path(info.data.get("dataset"), data_path, must_exist=True)

    @field_validator("resolution")
    @classmethod
    def _resolution_fits_dataset(cls, resolution: int, info: ValidationInfo) -> int:
        check_resolution(info.data.get("dataset"), resolution, None)
        return resolution

    @field_validator("budgets_flops")
    @classmethod
    def _positive_budgets(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if not b > 0]
        if bad:
            raise ValueError(f"budgets must be positive FLOP counts; got {bad[0]!r}")
        return budgets

    @model_validator(mode="after")
    def _grid_within_limit(self) -> SweepSpec:
        """Count the grid before anything is built; refuse one above MAX_PLANNED_RUNS, naming its axes."""
        budgets = len(set(self.budgets_flops)) + (self.budgets.num if self.budgets else 0)
        grid = len(self.methods) * len(self.presets) * budgets * len(self.seeds)
        total = grid + len(self.runs)
        if total > MAX_PLANNED_RUNS:
            raise ValueError(
                f"the grid plans {total:,} runs ({len(self.methods)} methods x {len(self.presets)} presets x "
                f"{budgets} budgets x {len(self.seeds)} seeds, + {len(self.runs)} [[runs]]), above the limit of "
                f"{MAX_PLANNED_RUNS:,}; split it into several sweeps or shorten an axis"
            )
        return self

    @model_validator(mode="after")
    def _grid_not_empty(self) -> SweepSpec:
        """A grid with an empty axis plans nothing (or teachers only): refuse it, naming the axis."""
        if not self.methods and not self.runs:
            raise ValueError("methods: no methods and no [[runs]]; the sweep would plan nothing")
        if self.methods:
            empty = [name for name, values in (("presets", self.grid_presets()), ("seeds", self.seeds)) if not values]
            if not self.budget_values():
                empty.append("budgets_flops (or budgets)")
            if empty:
                raise ValueError(f"{', '.join(empty)} empty: the grid of methods x presets x budgets x seeds "
                                 "would plan no runs; give at least one value each")
            for preset in self.grid_presets():
                check_resolution(self.dataset, self.resolution, preset)
        return self

    @model_validator(mode="after")
    def _teacher_for_students(self) -> SweepSpec:
        students = {m for m in self.methods if m in STUDENT_METHODS} | {
            r.method for r in self.runs if r.method in STUDENT_METHODS
        }
        if students and not self.teacher.train:
            needed = set(self.grid_presets()) | {r.preset for r in self.runs if r.method in STUDENT_METHODS}
            missing = sorted(needed - set(self.teacher.checkpoints))
            if missing:
                raise ValueError(
                    f"methods {sorted(students)} need a teacher: set teacher.train = true with a teacher budget, "
                    f"or give teacher.checkpoints for presets {missing}"
                )
        return self

    def budget_values(self) -> list[float]:
        values = list(self.budgets_flops)
        if self.budgets is not None:
            values += self.budgets.values()
        return sorted(set(values))


class SpecError(ConfigError):
    """A sweep spec failed validation; the message names the file and each field path."""


def parse_spec(raw: dict[str, Any], source: str = "<spec>") -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(format_validation_error(source, error)) from None
    _check_run_fields(spec, source)
    if spec.executor.name == "slurm":
        check_profile(spec.executor.profile, f"{source}: invalid configuration\n  - executor.profile")
    return spec


def check_profile(name: str, where: str) -> None:
    """Raise a SpecError naming ``where`` when profile ``name`` does not exist or is invalid."""
    from cmscale.cluster.profiles import load_profile

    try:
        load_profile(name)
    except ConfigError as error:
        raise SpecError(f"{where}: {error}") from None


def _check_run_fields(spec: SweepSpec, source: str) -> None:
    """Each method's and the defaults' overrides must be RunConfig fields; report the bad path."""
    known = set(RunConfig.model_fields)
    sections = {"defaults": spec.defaults, "teacher.overrides": spec.teacher.overrides}
    sections |= {f"methods.{name}": options for name, options in spec.methods.items()}
    for section, options in sections.items():
        for key in options:
            if key in SPEC_OWNED_FIELDS:
                raise SpecError(
                    f"{source}: invalid configuration\n  - {section}.{key}: set by the sweep spec itself for each "
                    "run (its identity), so it cannot be overridden here; the spec's own fields "
                    f"({', '.join(SPEC_OWNED_FIELDS)}) are set at the top level, on the grid axes or in [[runs]]"
                )
            if key not in known:
                raise SpecError(
                    f"{source}: invalid configuration\n  - {section}.{key}: not a run setting; "
                    f"allowed: {', '.join(sorted(known))}"
                )


def load_spec(path: Path | str, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read a sweep spec, apply dotted ``overrides`` (``{"defaults.lr": 2e-4}``, as ``--set``), validate once."""
    raw = apply_overrides(read_toml(path, "sweep spec", SpecError), overrides or {})
    given = " ".join(f"{key}={value}" for key, value in (overrides or {}).items())
    return parse_spec(raw, f"{path} (with --set {given})" if overrides else str(path))


def _leaves(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every leaf of a nested table (lists are walked by index)."""
    leaves: list[tuple[str, Any]] = []
    items = table.items() if isinstance(table, dict) else enumerate(table)
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list, tuple)):
            leaves += _leaves(value, path)
        else:
            leaves.append((path, value))
    return leaves
