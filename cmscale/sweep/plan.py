"""Spec -> runs: an iso-FLOP grid of fully resolved RunConfigs with deterministic ids.

Each run's id is a readable prefix plus a hash of its resolved config, so the same spec plans the
same ids and changing one field changes exactly the ids of the runs it touches. A student's
teacher enters its identity through the teacher's run id (itself a hash), not through a path, so
ids do not depend on where results live.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cmscale.config import STUDENT_METHODS, RunConfig, format_validation_error
from cmscale.rundir import CKPT_DIR, atomic_write_json
from cmscale.sweep.spec import SpecError, SweepSpec

FINAL_CHECKPOINT = "final.pt"


@dataclass
class PlannedRun:
    run_id: str
    config: RunConfig
    stage: int  # 0 = teachers, 1 = students and baselines
    flops_per_step: int
    iterations: int
    depends_on: list[str] = field(default_factory=list)

    @property
    def images_seen(self) -> int:
        return self.iterations * self.config.batch_size

    def run_dir(self, root: Path) -> Path:
        return Path(root) / self.config.sweep / self.run_id


def run_id_for(config: RunConfig) -> str:
    identity = config.identity()
    if config.teacher_run_id:
        identity.pop("teacher_ckpt", None)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]
    budget = f"{config.budget_flops:.0e}F" if config.budget_flops else f"{config.budget_iters}it"
    return f"{config.method}-{config.preset}-{budget.replace('+', '')}-s{config.seed}-{digest}"


def teacher_checkpoint(root: Path, sweep: str, teacher_run_id: str) -> Path:
    return Path(root) / sweep / teacher_run_id / CKPT_DIR / FINAL_CHECKPOINT


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Merge dicts, one level deep for nested option tables (e.g. ``ect``, ``eval``)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def _default_flops_per_step(config: RunConfig) -> int:
    from cmscale.train import flops_per_step

    return flops_per_step(config)


def _counting_code_fingerprint() -> str:
    """Hash of the code that decides FLOPs per step (methods, models) and the torch version.

    Counts cached on disk under an older fingerprint are never used, so editing a model or a
    loss can never leave a stale count behind.
    """
    from importlib.metadata import version

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(version("torch").encode())
    for path in sorted([package / "methods.py", *(package / "models").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


class FlopsCache:
    """FLOPs per step per shape, in memory and in ``$CMSCALE_CACHE_DIR/flops_per_step.json``.

    Counting one shape traces a training step (seconds on a busy CPU); a sweep has few shapes
    and many runs, so each shape is counted once per code version, not once per plan.
    """

    def __init__(self, path: Path | None = None):
        if path is None:
            root = os.environ.get("CMSCALE_CACHE_DIR") or Path.home() / ".cache" / "cmscale"
            path = Path(root).expanduser() / "flops_per_step.json"
        self.path = Path(path)
        self.fingerprint = _counting_code_fingerprint()
        self.counts: dict[str, int] = {}
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("fingerprint") == self.fingerprint:
                self.counts = {key: int(value) for key, value in stored["counts"].items()}
        except (OSError, ValueError, KeyError, AttributeError):
            pass

    @staticmethod
    def key(config: RunConfig) -> str:
        channels = 1 if config.dataset == "digits" else 3
        weight_mlp = config.scm.weight_mlp_channels if config.method in ("sct", "scd") else 0
        return f"{config.method}/{config.preset}/{config.resolution}x{channels}/b{config.batch_size}/d{config.dropout}/w{weight_mlp}"

    def get(self, config: RunConfig) -> int | None:
        return self.counts.get(self.key(config))

    def put(self, config: RunConfig, flops: int) -> None:
        self.counts[self.key(config)] = int(flops)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"fingerprint": self.fingerprint, "counts": self.counts})
        except OSError:
            pass  # a read-only cache only costs time


def _iterations(budget_flops: float | None, budget_iters: int | None, flops_per_step: int) -> int:
    if budget_iters is not None:
        return budget_iters
    # Round to the nearest whole step: iterations x flops_per_step is within half a step of the budget.
    return max(1, round(budget_flops / flops_per_step))


class Planner:
    """Expands a validated spec. ``flops_fn`` counts FLOPs per step; counts are cached per shape."""

    def __init__(self, spec: SweepSpec, root: Path, source: str = "<spec>", flops_fn: Callable[[RunConfig], int] | None = None):
        self.spec = spec
        self.root = Path(root).resolve()
        self.source = source
        self.flops_fn = flops_fn or _default_flops_per_step
        # The disk cache holds counts of the real counter only; a custom flops_fn keeps to memory.
        self._disk = FlopsCache() if flops_fn is None else None
        self._flops_cache: dict[str, int] = {}

    def _flops(self, config: RunConfig) -> int:
        key = FlopsCache.key(config)
        if key not in self._flops_cache:
            flops = self._disk.get(config) if self._disk else None
            if flops is None:
                flops = int(self.flops_fn(config))
                if self._disk:
                    self._disk.put(config, flops)
            self._flops_cache[key] = flops
        return self._flops_cache[key]

    def _config(self, fields: dict[str, Any], where: str) -> RunConfig:
        try:
            return RunConfig.model_validate(fields)
        except ValidationError as error:
            raise SpecError(format_validation_error(f"{self.source} ({where})", error)) from None

    def _base(self) -> dict[str, Any]:
        spec = self.spec
        base = {"dataset": spec.dataset, "resolution": spec.resolution, "sweep": spec.name}
        if spec.data_path is not None:
            base["data_path"] = spec.data_path
        return _merge(base, spec.defaults)

    def _planned(self, fields: dict[str, Any], stage: int, where: str, depends_on: list[str]) -> PlannedRun:
        from cmscale.methods import BudgetError, check_budget_covers_a_step

        config = self._config(fields, where)
        flops_per_step = self._flops(config)
        if config.budget_flops is not None:
            try:
                check_budget_covers_a_step(config.budget_flops, flops_per_step, "budget_flops")
            except BudgetError as error:
                raise SpecError(f"{self.source} ({where}): invalid configuration\n  - {error}") from None
        iterations = _iterations(config.budget_flops, config.budget_iters, flops_per_step)
        run_id = run_id_for(config)
        config = config.model_copy(update={"run_id": run_id})
        return PlannedRun(run_id, config, stage, flops_per_step, iterations, depends_on)

    def teachers(self) -> dict[tuple[str, int], PlannedRun]:
        """One EDM teacher per (preset, seed) when the spec trains teachers."""
        spec = self.spec
        if not spec.teacher.train:
            return {}
        pairs = [(preset, seed) for preset in spec.presets for seed in spec.seeds]
        pairs += [(r.preset, r.seed) for r in spec.runs if r.method in STUDENT_METHODS]
        planned = {}
        for preset, seed in dict.fromkeys(pairs):
            budget = {"budget_flops": spec.teacher.budget_flops, "budget_iters": spec.teacher.budget_iters}
            fields = _merge(
                self._base(), spec.methods.get("edm", {}), spec.teacher.overrides,
                {"method": "edm", "preset": preset, "seed": seed}, budget,
            )
            planned[preset, seed] = self._planned(fields, stage=0, where=f"teacher for preset {preset}, seed {seed}", depends_on=[])
        return planned

    def _teacher_fields(self, preset: str, seed: int, teachers: dict[tuple[str, int], PlannedRun]) -> tuple[dict[str, Any], list[str]]:
        if (preset, seed) in teachers:
            teacher = teachers[preset, seed]
            path = teacher_checkpoint(self.root, self.spec.name, teacher.run_id)
            return {"teacher_ckpt": str(path), "teacher_run_id": teacher.run_id}, [teacher.run_id]
        return {"teacher_ckpt": self.spec.teacher.checkpoints[preset]}, []

    def plan(self) -> list[PlannedRun]:
        # Planning builds one config per run and keeps them all; with the cyclic collector on,
        # a 10,000-run plan spends a third of its time scanning them. Nothing here makes cycles.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._plan()
        finally:
            if collecting:
                gc.enable()

    def _plan(self) -> list[PlannedRun]:
        spec = self.spec
        teachers = self.teachers()
        runs: list[PlannedRun] = list(teachers.values())
        grid = [
            (method, preset, budget, seed)
            for method in spec.methods
            for preset in spec.presets
            for budget in spec.budget_values()
            for seed in spec.seeds
        ]
        for method, preset, budget, seed in grid:
            fields = _merge(self._base(), spec.methods[method], {"method": method, "preset": preset, "budget_flops": budget, "seed": seed})
            depends_on: list[str] = []
            if method in STUDENT_METHODS or (method == "sct" and (preset, seed) in teachers):
                teacher_fields, depends_on = self._teacher_fields(preset, seed, teachers)
                fields |= teacher_fields
            runs.append(self._planned(fields, stage=1, where=f"methods.{method}, preset {preset}, budget {budget:g}, seed {seed}", depends_on=depends_on))
        for index, explicit in enumerate(spec.runs):
            extra = explicit.model_dump(exclude_none=True)
            method = extra["method"]
            fields = _merge(self._base(), spec.methods.get(method, {}), extra)
            depends_on = []
            if method in STUDENT_METHODS:
                teacher_fields, depends_on = self._teacher_fields(explicit.preset, explicit.seed, teachers)
                fields |= teacher_fields
            runs.append(self._planned(fields, stage=1, where=f"runs[{index}]", depends_on=depends_on))
        seen: set[str] = set()
        unique = []
        for run in runs:
            if run.run_id not in seen:
                seen.add(run.run_id)
                unique.append(run)
        return unique


def plan_sweep(spec: SweepSpec, root: Path, source: str = "<spec>", flops_fn: Callable[[RunConfig], int] | None = None) -> list[PlannedRun]:
    return Planner(spec, root, source, flops_fn).plan()
