"""Tune spec: an Optuna search over run settings, validated once from TOML.

Example (``examples/tune_digits.toml``)::

    name = "digits_ect_tune"
    n_trials = 6
    workers = 2
    # storage = "postgresql://user@host/db"   # default: <root>/<name>/optuna.journal

    [base]                                    # a RunConfig: every trial starts from it
    method = "ect"
    preset = "xxs"
    budget_flops = 3e11
    teacher_ckpt = "results/teachers/edm_xxs/ckpt/final.pt"
    [base.eval]
    at_fractions = [0.5, 1.0]                 # intermediate FIDs feed the pruner

    [space.lr]                                # a parameter is a dotted RunConfig path
    type = "float"
    low = 1e-4
    high = 3e-3
    log = true
    [space.ect.q]                             # nested tables name nested settings: "ect.q"
    type = "categorical"
    choices = [2.0, 4.0]
    [space.scm.warmup_iters]
    type = "int"
    low = 0
    high = 200
    methods = ["sct", "scd"]                  # only suggested when the trial's method is one of these

    [objective]
    metrics = ["fid_2step"]                   # or ["fid", "nfe"], ["fid_2step", "train_flops"]: a Pareto front

    [sampler]
    name = "tpe"                              # tpe | gp | cmaes | grid | random
    [pruner]
    name = "median"                           # none | median | hyperband

Parameters other than run settings: ``sampler_steps`` sets ``eval.cm_steps = [value]`` (the
step count behind the ``fid`` and ``nfe`` metrics). Metrics: ``fid_<k>step`` (FID with k sampler
steps at the end of the budget), ``fid`` and ``nfe`` (FID and function evaluations with the trial's
first sampler step count), ``train_flops``, ``params`` (network parameters) and ``wall_s``.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from cmscale.cluster.executors import ExecutorKind
from cmscale.config import (
    DATASETS_WITH_FILES,
    ConfigError,
    MethodName,
    ProfileRef,
    RunConfig,
    SafeName,
    StrictModel,
    apply_overrides,
    read_toml,
    resolve_path,
    set_dotted,
)

SAMPLER_STEPS_PARAM = "sampler_steps"
NOT_SEARCHABLE = {"run_id", "sweep"}
PARAM_TYPES = ("float", "int", "categorical")
METRIC_PATTERN = re.compile(r"^(fid_(?P<steps>\d+)step|fid|nfe|train_flops|params|wall_s)$")
FID_METRICS = re.compile(r"^fid(_\d+step)?$")


class FloatParam(StrictModel):
    """A float in [low, high]; ``log`` samples uniformly in log space; ``step`` discretises."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)
    methods: list[MethodName] | None = Field(None, description="suggest only for trials of these methods")
    grid: list[float] | None = Field(None, min_length=1, description="values for the grid sampler")


class IntParam(StrictModel):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)
    methods: list[MethodName] | None = None
    grid: list[int] | None = Field(None, min_length=1)


class CategoricalParam(StrictModel):
    type: Literal["categorical"]
    choices: list[str | int | float | bool] = Field(min_length=1)
    methods: list[MethodName] | None = None


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class ObjectiveSpec(StrictModel):
    metrics: list[str] = Field(default_factory=lambda: ["fid_2step"], min_length=1)
    directions: list[Literal["minimize", "maximize"]] | None = Field(None, description="default: minimise every metric")

    def resolved_directions(self) -> list[str]:
        return list(self.directions) if self.directions else ["minimize"] * len(self.metrics)

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1


class SamplerSpec(StrictModel):
    name: Literal["tpe", "gp", "cmaes", "grid", "random"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0, description="random trials before TPE/GP/CMA-ES model the space")
    multivariate: bool = Field(True, description="TPE: model parameters jointly")


class PrunerSpec(StrictModel):
    """Pruning on intermediate FID. Steps are per-mille of the run's budget (0..1000)."""

    name: Literal["none", "median", "hyperband"] = "none"
    n_startup_trials: int = Field(2, ge=0, description="median: finished trials before pruning starts")
    n_warmup_steps: int = Field(0, ge=0, description="median: per-mille of budget before a trial may be pruned")
    min_resource: int = Field(100, ge=1, description="hyperband: smallest per-mille of budget a trial gets")
    reduction_factor: int = Field(3, ge=2)


class TuneExecutorSpec(StrictModel):
    name: ExecutorKind = "local"
    profile: ProfileRef = "local"
    timeout_min: int = Field(120, ge=1, description="wall-clock limit of one worker")


class TuneSpec(StrictModel):
    name: SafeName
    n_trials: int = Field(ge=1)
    workers: int = Field(1, ge=1)
    storage: str | None = Field(None, description="Optuna storage URL; default: a journal file under the results root")
    zombie_after_s: float = Field(
        300.0, gt=0, description="a RUNNING trial whose run heartbeat is older than this is failed and retried"
    )
    max_retry: int = Field(2, ge=0, description="retries of a trial whose worker died")
    base: dict[str, Any]
    space: dict[str, Param] = Field(min_length=1)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    executor: TuneExecutorSpec = Field(default_factory=TuneExecutorSpec)
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="trials to run first, with these params")

    @property
    def pruning(self) -> bool:
        """Optuna cannot prune multi-objective studies, so pruning is on only for one metric."""
        return self.pruner.name != "none" and not self.objective.multi

    def methods_searched(self) -> list[str]:
        param = self.space.get("method")
        if isinstance(param, CategoricalParam):
            return [str(choice) for choice in param.choices]
        return [str(self.base.get("method"))]

    def run_config(self, params: dict[str, Any], **fields: Any) -> RunConfig:
        return RunConfig.model_validate(apply_params(self.base, params) | fields)


class TuneSpecError(ConfigError):
    """A tune spec failed validation; the message names the file and each field path."""


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base run settings with each dotted parameter set (``ect.q`` -> base["ect"]["q"])."""
    merged = copy.deepcopy(base)
    for name, value in params.items():
        if name == SAMPLER_STEPS_PARAM:
            # EDM teachers are evaluated with Heun steps, consistency models with CM steps.
            dotted = "edm.heun_steps" if merged.get("method") == "edm" else "eval.cm_steps"
            set_dotted(merged, dotted, [int(value)])
        else:
            set_dotted(merged, name, value)
    return merged


def run_setting_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted path to a leaf setting of RunConfig (``lr``, ``ect.q``, ``eval.num_samples``...)."""
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += run_setting_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _flatten_space(space: Any, prefix: str = "") -> dict[str, Any]:
    """``[space.ect.q]`` parses as nested tables; a table without ``type`` is a group of parameters."""
    if not isinstance(space, dict):
        return space
    flat: dict[str, Any] = {}
    for key, value in space.items():
        if (
            isinstance(value, dict)
            and "type" not in value
            and value
            and all(isinstance(v, dict) for v in value.values())
        ):
            flat |= _flatten_space(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _loc(parts: tuple) -> str:
    # Drop the discriminator tag pydantic puts after the parameter name (space.lr.float.low).
    parts = tuple(parts)
    if len(parts) > 2 and parts[0] == "space" and parts[2] in PARAM_TYPES:
        parts = parts[:2] + parts[3:]
    return ".".join(str(part) for part in parts) or "(top level)"


def _errors(source: str, items: list[tuple[str, str]]) -> TuneSpecError:
    lines = [f"{source}: invalid tune spec"] + [f"  - {path}: {message}" for path, message in items]
    return TuneSpecError("\n".join(lines))


def _pydantic_items(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    return [(prefix + _loc(item["loc"]), item["msg"].removeprefix("Value error, ")) for item in error.errors()]


def parse_tune_spec(raw: dict[str, Any], source: str = "<tune spec>") -> TuneSpec:
    raw = dict(raw)
    if "space" in raw:
        raw["space"] = _flatten_space(raw["space"])
    try:
        spec = TuneSpec.model_validate(raw)
    except ValidationError as error:
        raise _errors(source, _pydantic_items(error)) from None
    problems: list[tuple[str, str]] = []
    problems += _check_base(spec)
    if not problems:
        problems += _check_space(spec)
    problems += _check_objective(spec)
    problems += _check_sampler(spec)
    problems += _check_enqueue(spec)
    if problems:
        raise _errors(source, problems)
    return spec


def load_tune_spec(path: Path | str, overrides: dict[str, Any] | None = None) -> TuneSpec:
    """Read and validate a spec file, with dotted ``overrides`` (``--set``) applied first. Relative
    ``base.teacher_ckpt``/``base.data_path`` are looked up in the working directory, then beside the
    spec, and stored absolute (workers may run elsewhere)."""
    path = Path(path)
    raw = apply_overrides(read_toml(path, "tune spec", TuneSpecError), overrides or {})
    base = raw.get("base")
    if isinstance(base, dict):
        for key in ("teacher_ckpt", "data_path"):
            if isinstance(base.get(key), str):
                base[key] = resolve_path(base[key], path.parent, absolute=True)
    given = " ".join(f"{key}={value}" for key, value in (overrides or {}).items())
    spec = parse_tune_spec(raw, f"{path} (with --set {given})" if overrides else str(path))
    data_path = spec.base.get("data_path")
    if spec.base.get("dataset") in DATASETS_WITH_FILES and data_path and not Path(data_path).exists():
        message = f"{data_path} does not exist; give the folder (or file) that holds the {spec.base['dataset']} data"
        raise _errors(str(path), [("base.data_path", message)])
    teacher = spec.base.get("teacher_ckpt")
    if teacher and not Path(teacher).is_file():
        raise _errors(
            str(path),
            [
                (
                    "base.teacher_ckpt",
                    f"{teacher} not found; train the EDM teacher first (its run "
                    "writes ckpt/final.pt), e.g. `cmscale train examples/train_digits_edm.toml`",
                )
            ],
        )
    return spec


def _base_for(spec: TuneSpec, method: str | None = None) -> dict[str, Any]:
    return spec.base | ({"method": method} if method else {})


def _check_base(spec: TuneSpec) -> list[tuple[str, str]]:
    problems = []
    for method in spec.methods_searched() if "method" in spec.space else [None]:
        try:
            RunConfig.model_validate(_base_for(spec, method))
        except ValidationError as error:
            suffix = f" (with method = {method!r} from space.method)" if method else ""
            problems += [(path, message + suffix) for path, message in _pydantic_items(error, "base.")]
    at_fractions = (
        RunConfig.model_validate(_base_for(spec, spec.methods_searched()[0])).eval.at_fractions if not problems else []
    )
    if not problems and 1.0 not in at_fractions:
        problems.append(
            ("base.eval.at_fractions", "must include 1.0: the objective is measured at the end of the budget")
        )
    return problems


def _check_space(spec: TuneSpec) -> list[tuple[str, str]]:
    known = set(run_setting_paths()) - NOT_SEARCHABLE
    problems: list[tuple[str, str]] = []
    methods = spec.methods_searched()
    for name, param in spec.space.items():
        where = f"space.{name}"
        if name not in known and name != SAMPLER_STEPS_PARAM:
            close = difflib.get_close_matches(name, sorted(known | {SAMPLER_STEPS_PARAM}), n=3)
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else f"; parameters are dotted run settings such as lr, ect.q, scm.P_mean, or {SAMPLER_STEPS_PARAM}"
            )
            problems.append((where, f"unknown parameter {name!r}: not a run setting{hint}"))
            continue
        if name == "method" and not isinstance(param, CategoricalParam):
            problems.append((f"{where}.type", "method can only be categorical"))
            continue
        if isinstance(param, (FloatParam, IntParam)):
            if param.low > param.high:
                problems.append((f"{where}.low", f"low ({param.low}) must be <= high ({param.high})"))
                continue
            if param.log and param.low <= 0:
                problems.append((f"{where}.low", f"log scale needs low > 0 (got {param.low})"))
                continue
            if param.log and param.step not in (None, 1):
                problems.append((f"{where}.step", "a log-scaled parameter cannot have a step"))
                continue
        if param.methods is not None and not set(param.methods) & set(methods):
            problems.append((f"{where}.methods", f"applies to {param.methods} but the study runs only {methods}"))
            continue
        problems += _check_values_accepted(spec, name, param, methods)
    return problems


def _check_values_accepted(spec: TuneSpec, name: str, param: Any, methods: list[str]) -> list[tuple[str, str]]:
    """Each bound (or choice) must give a valid RunConfig, so a trial never fails on validation."""
    problems = []
    if isinstance(param, CategoricalParam):
        candidates = [(f"choices.{i}", choice) for i, choice in enumerate(param.choices)]
    else:
        candidates = [("low", param.low), ("high", param.high)]
        for i, value in enumerate(param.grid or []):
            if not param.low <= value <= param.high:
                problems.append((f"space.{name}.grid.{i}", f"{value!r} lies outside [low, high] = "
                                                           f"[{param.low}, {param.high}]; Optuna would refuse it"))
            else:
                candidates.append((f"grid.{i}", value))
    usable = [m for m in methods if param.methods is None or m in param.methods]
    for field, value in candidates:
        method_for = value if name == "method" else usable[0]
        try:
            RunConfig.model_validate(apply_params(_base_for(spec, str(method_for)), {name: value}))
        except ValidationError as error:
            reason = "; ".join(item["msg"] for item in error.errors())
            problems.append((f"space.{name}.{field}", f"{value!r} is not a valid {name}: {reason}"))
    return problems


def _check_objective(spec: TuneSpec) -> list[tuple[str, str]]:
    problems = []
    objective = spec.objective
    if objective.directions is not None and len(objective.directions) != len(objective.metrics):
        problems.append(("objective.directions", f"give one direction per metric ({len(objective.metrics)})"))
    if len(set(objective.metrics)) != len(objective.metrics):
        problems.append(("objective.metrics", "each metric at most once"))
    steps_searched = SAMPLER_STEPS_PARAM in spec.space
    try:
        from cmscale.methods import sampler_steps

        base_steps = sampler_steps(RunConfig.model_validate(_base_for(spec, spec.methods_searched()[0])))
    except ValidationError:
        base_steps = []
    for i, metric in enumerate(objective.metrics):
        match = METRIC_PATTERN.match(metric)
        if not match:
            problems.append(
                (
                    f"objective.metrics.{i}",
                    f"unknown metric {metric!r}; use fid_<k>step, fid, nfe, train_flops, params or wall_s",
                )
            )
        elif match.group("steps") and not steps_searched and int(match.group("steps")) not in base_steps:
            problems.append(
                (
                    f"objective.metrics.{i}",
                    f"{metric} needs {match.group('steps')} among the evaluated sampler steps (base.eval.cm_steps, or "
                    f"edm.heun_steps for EDM; now {base_steps})",
                )
            )
    if objective.multi and all(not FID_METRICS.match(m) for m in objective.metrics):
        problems.append(("objective.metrics", "a search needs at least one FID metric"))
    return problems


def _check_sampler(spec: TuneSpec) -> list[tuple[str, str]]:
    name = spec.sampler.name
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        return [("sampler.name", "'cmaes' needs the cmaes package (pip install cmaes); or use tpe, gp or random")]
    if name == "gp" and importlib.util.find_spec("scipy") is None:
        return [("sampler.name", "'gp' needs scipy (pip install scipy)")]
    if name == "grid":
        problems = [(f"space.{n}.grid", "the grid sampler needs a finite list of values for float parameters")
                    for n, p in spec.space.items() if isinstance(p, FloatParam) and p.grid is None and p.step is None]
        if not problems:
            points = math.prod(grid_size(p) for p in spec.space.values())
            if spec.n_trials > points:
                problems.append(("n_trials", f"the grid has {points} points; n_trials must be <= {points}"))
        return problems
    return []


def _check_enqueue(spec: TuneSpec) -> list[tuple[str, str]]:
    problems = []
    for i, params in enumerate(spec.enqueue):
        for key in params:
            if key not in spec.space:
                problems.append((f"enqueue.{i}.{key}", f"not a parameter of the space ({', '.join(spec.space)})"))
    return problems


def grid_size(param: Any) -> int:
    """How many values :func:`grid_values` gives, without building them."""
    if isinstance(param, CategoricalParam):
        return len(param.choices)
    if param.grid is not None:
        return len(param.grid)
    if isinstance(param, IntParam):
        return max(0, (param.high - param.low) // param.step + 1)
    return int(round((param.high - param.low) / param.step)) + 1


def grid_values(param: Any) -> list[Any]:
    """The values the grid sampler walks for one parameter."""
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if param.grid is not None:
        return list(param.grid)
    if isinstance(param, IntParam):
        return list(range(param.low, param.high + 1, param.step))
    count = int(round((param.high - param.low) / param.step)) + 1
    return [param.low + i * param.step for i in range(count)]


__all__ = [
    "CategoricalParam", "FloatParam", "IntParam", "ObjectiveSpec", "PrunerSpec", "SamplerSpec", "TuneSpec",
    "TuneSpecError", "apply_params", "grid_values", "load_tune_spec", "parse_tune_spec", "run_setting_paths",
]
