"""Spec -> runs: an iso-FLOP grid of fully resolved RunConfigs with deterministic ids, and the
plan on disk (``<root>/<sweep>/sweep.json``).

Each run's id is a readable prefix plus a hash of its resolved config, so the same spec plans the
same ids and changing one field changes exactly the ids of the runs it touches. A student's
teacher enters its identity through the teacher's run id (itself a hash), not through a path, so
ids do not depend on where results live.

A run's iteration count is computed here, once, by :func:`cmscale.accounting.iterations_for_budget`
(the trainer's own function, with the shared FLOPs cache), stored in sweep.json as ``iterations``
and handed to the job, whose trainer checks it.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cmscale.accounting import BudgetError, FlopsCache, flops_per_step, iterations_for_budget
from cmscale.config import STUDENT_METHODS, RunConfig, format_validation_error, merge_settings
from cmscale.methods import recipe_of
from cmscale.rundir import (
    SWEEP_FILE,
    atomic_write_json,
    final_checkpoint,
    read_json,
    read_sweep_file,  # noqa: F401 - re-exported: the sweep commands and tests read the plan from here
    sweep_dir,
)
from cmscale.sweep.spec import SpecError, SweepSpec


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
    """``<method>-<preset>-<budget>-s<seed>-<hash of the config's identity>``.

    A student's teacher enters through ``teacher_run_id`` when it has one, not through the path of
    its checkpoint, so an id does not depend on the results root.
    """
    identity = config.identity()
    if config.teacher_run_id:
        identity.pop("teacher_ckpt", None)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]
    # Three significant digits: 1.2e11 reads "1.2e11F", not "1e11F" (the digest tells runs apart anyway).
    budget = f"{config.budget_flops:.3g}F" if config.budget_flops else f"{config.budget_iters}it"
    return f"{config.method}-{config.preset}-{budget.replace('+', '')}-s{config.seed}-{digest}"


def teacher_checkpoint(root: Path, sweep: str, teacher_run_id: str) -> Path:
    return final_checkpoint(Path(root) / sweep / teacher_run_id)


class Planner:
    """Expands a validated spec. ``flops_fn`` counts FLOPs per step; counts are cached per shape."""

    def __init__(self, spec: SweepSpec, root: Path, source: str = "<spec>",
                 flops_fn: Callable[[RunConfig], int] | None = None):
        self.spec = spec
        self.root = Path(root).resolve()
        self.source = source
        # The real counter goes through the process-wide cache the trainer uses; a custom
        # flops_fn (tests, benchmarks) gets a cache of its own, in memory only.
        self._flops: Callable[[RunConfig], int] = flops_per_step if flops_fn is None else FlopsCache(flops_fn)
        self._models = spec.defined_models()

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
        return merge_settings(base, spec.defaults)

    def _planned(self, fields: dict[str, Any], stage: int, where: str, depends_on: list[str]) -> PlannedRun:
        model = self._models.get(fields.get("preset"))
        if model is not None:  # a size the spec defines: its architecture travels with (and identifies) the run
            fields = fields | {"architecture": model.model_dump()}
        config = self._config(fields, where)
        try:
            iterations = iterations_for_budget(config, self._flops)
        except BudgetError as error:
            raise SpecError(f"{self.source} ({where}): invalid configuration\n  - {error}") from None
        run_id = run_id_for(config)
        config = config.model_copy(update={"run_id": run_id})
        return PlannedRun(run_id, config, stage, self._flops(config), iterations, depends_on)

    def teachers(self) -> dict[tuple[str, int], PlannedRun]:
        """One EDM teacher per (preset, seed) when the spec trains teachers."""
        spec = self.spec
        if not spec.teacher.train:
            return {}
        pairs = [(preset, seed) for preset in spec.grid_presets() for seed in spec.seeds]
        pairs += [(r.preset, r.seed) for r in spec.runs if r.method in STUDENT_METHODS]
        planned = {}
        for preset, seed in dict.fromkeys(pairs):
            budget = {"budget_flops": spec.teacher.budget_flops, "budget_iters": spec.teacher.budget_iters}
            fields = merge_settings(
                self._base(),
                spec.methods.get("edm", {}),
                spec.teacher.overrides,
                {"method": "edm", "preset": preset, "seed": seed},
                budget,
            )
            planned[preset, seed] = self._planned(
                fields, stage=0, where=f"teacher for preset {preset}, seed {seed}", depends_on=[]
            )
        return planned

    def _teacher_fields(
        self, preset: str, seed: int, teachers: dict[tuple[str, int], PlannedRun]
    ) -> tuple[dict[str, Any], list[str]]:
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
            return self._expand()
        finally:
            if collecting:
                gc.enable()

    def _expand(self) -> list[PlannedRun]:
        spec = self.spec
        teachers = self.teachers()
        runs: list[PlannedRun] = list(teachers.values())
        grid = [
            (method, preset, budget, seed)
            for method in spec.methods
            for preset in spec.grid_presets()
            for budget in spec.budget_values()
            for seed in spec.seeds
        ]
        for method, preset, budget, seed in grid:
            fields = merge_settings(
                self._base(),
                spec.methods[method],
                {"method": method, "preset": preset, "budget_flops": budget, "seed": seed},
            )
            depends_on: list[str] = []
            if method in STUDENT_METHODS or (recipe_of(method).teacher == "optional" and (preset, seed) in teachers):
                teacher_fields, depends_on = self._teacher_fields(preset, seed, teachers)
                fields |= teacher_fields
            runs.append(
                self._planned(
                    fields,
                    stage=1,
                    where=f"methods.{method}, preset {preset}, budget {budget:g}, seed {seed}",
                    depends_on=depends_on,
                )
            )
        for index, explicit in enumerate(spec.runs):
            extra = explicit.model_dump(exclude_none=True)
            method = extra["method"]
            fields = merge_settings(self._base(), spec.methods.get(method, {}), extra)
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


def plan_sweep(
    spec: SweepSpec, root: Path, source: str = "<spec>", flops_fn: Callable[[RunConfig], int] | None = None
) -> list[PlannedRun]:
    return Planner(spec, root, source, flops_fn).plan()


# ----------------------------------------------------------------------------------------------
# The plan on disk


def spec_digest(spec: SweepSpec) -> str:
    """What makes two specs the same sweep: every field but how the runs are executed."""
    identity = spec.model_dump(mode="json", exclude={"executor"})
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def check_sweep_identity(root: Path, spec: SweepSpec, runs: list[PlannedRun], spec_path: str,
                         new_version: bool = False) -> dict[str, Any] | None:
    """The stored plan of sweep ``spec.name`` (None if there is none), after refusing a different
    spec under the same name: a sweep name names one spec, so status and the store never mix two.

    ``new_version``: the spec is a new version of the sweep; its runs join the earlier ones."""
    path = sweep_dir(root, spec.name) / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        stored = read_json(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise SpecError(f"{path}: not valid JSON ({error}); it is the plan of sweep {spec.name!r}: restore it "
                        "or remove it to plan the sweep anew") from None
    digest = spec_digest(spec)
    known = [version.get("spec_digest") for version in stored.get("versions") or []]
    if digest in known or new_version:
        return stored
    if not known and {entry.get("run_id") for entry in stored.get("runs") or []} == {run.run_id for run in runs}:
        return stored  # planned before specs were recorded by digest: the same runs are the same sweep
    earlier = stored.get("spec_path") or "an earlier spec"
    raise SpecError(
        f"{spec_path or '<spec>'}: sweep name {spec.name!r} is taken under {Path(root)} by a different spec "
        f"({earlier}, {len(stored.get('runs') or [])} runs; this one plans {len(runs)}). Give this spec a new "
        "name, or pass --new-version to add its runs to the sweep (the earlier runs are kept)"
    )


def write_sweep_file(root: Path, sweep: str, runs: list[PlannedRun], spec_path: str,
                     executor: str | None = None, profile: str | None = None,
                     spec: SweepSpec | None = None, new_version: bool = False,
                     overrides: dict[str, Any] | None = None) -> None:
    """The plan on disk; ``executor`` and ``profile`` are what ``relaunch`` reuses by default, and
    ``spec`` (as validated, after any ``--set`` ``overrides``) is what it re-plans from.

    With ``spec``, a different spec already planned under the name is refused
    (:func:`check_sweep_identity`); a new version keeps the earlier versions' runs in the plan."""
    stored = check_sweep_identity(root, spec, runs, spec_path, new_version) if spec is not None else None
    versions = list((stored or {}).get("versions") or [])
    if spec is not None and spec_digest(spec) not in [v.get("spec_digest") for v in versions]:
        versions.append({"spec_digest": spec_digest(spec), "spec_path": spec_path, "runs": len(runs)})
    entries = [
        {
            "run_id": run.run_id,
            "stage": run.stage,
            "depends_on": run.depends_on,
            "iterations": run.iterations,
            "flops_per_step": run.flops_per_step,
            "config": run.config.model_dump(mode="json"),
        }
        for run in runs
    ]
    planned = {run.run_id for run in runs}
    entries += [entry for entry in (stored or {}).get("runs") or [] if entry.get("run_id") not in planned]
    atomic_write_json(
        sweep_dir(root, sweep) / SWEEP_FILE,
        {
            "sweep": sweep,
            "spec_path": spec_path,
            "executor": executor,
            "profile": profile,
            "overrides": dict(overrides or {}),
            "spec": spec.model_dump(mode="json") if spec is not None else None,
            "versions": versions,
            "runs": entries,
        },
    )
