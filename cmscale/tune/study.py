"""Optuna searches whose trials are ordinary cmscale runs: the study, its trials and the claims.

On disk, under the results root (file names in :mod:`cmscale.rundir`; the folder, ``tune.json`` and
the journal are :mod:`cmscale.tune.storage`)::

    <root>/<study>/tune.json        the validated spec, the storage URL, n_trials, submitted jobs
    <root>/<study>/optuna.journal   Optuna's JournalStorage (the default storage; any URL is accepted)
    <root>/<study>/claim.lock       held while a worker reaps zombies and claims a trial
    <root>/<study>/<run_id>/        one run per trial (config.json, metrics.jsonl, ..., trial.json)

Every worker (:mod:`cmscale.tune.worker`) loops: under the claim lock it fails the zombie trials
(RUNNING, but their worker is gone: its pid is dead on this host, or the run's heartbeat is older
than ``zombie_after_s``) and enqueues each again with the same parameters and run directory, so the
retry resumes from the run's newest checkpoint; then it counts the trials that use up the budget
(COMPLETE, PRUNED, RUNNING, and FAIL not retried) and asks for a new trial only while that count
is below ``n_trials``. So a study killed and started again ends with exactly ``n_trials`` such
trials. The lock is an ``open(O_CREAT | O_EXCL)`` lock file (Optuna's JournalFileOpenLock), which
is safe on NFS, unlike symlink or fcntl locks.

A :class:`Search` keeps the storage this module opened beside the study, so trials are read and
marked through the public ``BaseStorage`` API (by study id and trial number), never through
Optuna's private attributes.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.storages.journal import JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from cmscale.cluster.slurm import current_job_id
from cmscale.config import RunConfig
from cmscale.rundir import (
    CLAIM_LOCK,
    CONFIG_FILE,
    TRIAL_FILE,
    TUNE_FILE,
    atomic_write_json,
    heartbeat_age_s,
    pid_alive,
    read_json,
)
from cmscale.tune.spec import TuneSpec, grid_values
from cmscale.tune.storage import (
    TuneError,
    open_storage,
    read_tune_file,
    spec_digest,
    stored_spec,
    study_dir,
    write_tune_file,
)

PROGRESS_STEPS = 1000  # intermediate values are reported at per-mille of the run's budget

# user attrs kept on each Optuna trial
RUN_ID_ATTR = "run_id"
HOST_ATTR = "worker_host"
PID_ATTR = "worker_pid"
JOB_ATTR = "worker_job_id"
RETRIED_ATTR = "retried"
REASON_ATTR = "fail_reason"


# ----------------------------------------------------------------------------------------------
# Sampler, pruner and study


def build_sampler(spec: TuneSpec, trial_number: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded for the trial about to be asked.

    Samplers keep their random state in the process, so workers sharing one seed would propose the
    same random trials, and a restarted worker would repeat its earlier ones. Seeding with
    ``seed + trial_number`` (the claim lock makes the number known) keeps a study reproducible in
    claim order without duplicates. Everything else the samplers learn comes from the storage.
    """
    options = spec.sampler
    name = options.name
    seed = None if options.seed is None else options.seed + trial_number
    if name == "tpe":
        # constant_liar: trials still running count as bad guesses, so parallel workers spread out.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=options.n_startup_trials,
                                          multivariate=options.multivariate, constant_liar=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=options.n_startup_trials)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=options.n_startup_trials)
    if name == "grid":
        return optuna.samplers.GridSampler({n: grid_values(p) for n, p in spec.space.items()}, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def build_pruner(spec: TuneSpec) -> optuna.pruners.BasePruner:
    options = spec.pruner
    if not spec.pruning:
        return optuna.pruners.NopPruner()
    if options.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=options.n_startup_trials, n_warmup_steps=options.n_warmup_steps
        )
    return optuna.pruners.HyperbandPruner(
        min_resource=options.min_resource, max_resource=PROGRESS_STEPS, reduction_factor=options.reduction_factor
    )


def pruning_note(spec: TuneSpec) -> str | None:
    """Why pruning is off although a pruner was asked for (Optuna cannot prune multi-objective)."""
    if spec.pruner.name != "none" and spec.objective.multi:
        return (
            f"pruning is off: the study has {len(spec.objective.metrics)} objectives "
            f"({', '.join(spec.objective.metrics)}) and Optuna prunes single-objective studies only; "
            f"pruner {spec.pruner.name!r} is ignored and every trial runs its full budget"
        )
    return None


@dataclass
class Search:
    """A study with the storage it was opened on: trials are read and changed through the storage's
    public API by (study id, trial number)."""

    spec: TuneSpec
    root: Path
    storage: BaseStorage
    study: optuna.Study
    _study_id: int | None = field(default=None, repr=False)

    @property
    def study_id(self) -> int:
        if self._study_id is None:
            self._study_id = self.storage.get_study_id_from_name(self.spec.name)
        return self._study_id

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def frozen(self, number: int) -> FrozenTrial:
        """The trial as stored now (its state may have been changed by another worker)."""
        return self.storage.get_trial(self.trial_id(number))


def open_search(spec: TuneSpec, root: Path | str, create: bool = False) -> Search:
    """Open (or, with ``create``, create) the study of ``spec`` on its storage."""
    storage = open_storage(spec.storage, root, spec.name)
    kwargs = dict(study_name=spec.name, storage=storage, sampler=build_sampler(spec), pruner=build_pruner(spec))
    if create:
        study = optuna.create_study(directions=spec.objective.resolved_directions(), load_if_exists=True, **kwargs)
    else:
        study = optuna.load_study(**kwargs)
    return Search(spec, Path(root), storage, study)


def load_study(spec: TuneSpec, root: Path | str) -> optuna.Study:
    return open_search(spec, root).study


def create_study(spec: TuneSpec, root: Path | str, spec_path: str = "", new_version: bool = False) -> Search:
    """Create the study (or load it: re-running continues it) and enqueue the spec's fixed trials once.

    A study name names one spec: another base, space or objective under it is refused, naming both
    specs, unless ``new_version`` (its trials then join the study; each trial keeps its own settings)."""
    tune_file = study_dir(root, spec.name) / TUNE_FILE
    if tune_file.is_file():
        stored = read_json(tune_file)
        known = {version.get("spec_digest") for version in stored.get("versions") or []}
        known.add(spec_digest(TuneSpec.model_validate(stored["spec"])))
        if spec_digest(spec) not in known and not new_version:
            raise TuneError(
                f"{spec_path or '<spec>'}: study {spec.name!r} under {Path(root)} was started from a different spec "
                f"({stored.get('spec_path') or 'an earlier spec'}: its base, space or objective differ). Give this "
                "spec a new name, or pass --new-version to add its trials to the study"
            )
        before = TuneSpec.model_validate(stored["spec"]).objective
        if (before.metrics, before.resolved_directions()) != (
            spec.objective.metrics,
            spec.objective.resolved_directions(),
        ):
            raise TuneError(
                f"study {spec.name!r} exists with objective {before.metrics} {before.resolved_directions()}; "
                f"a study keeps its objective, so give this spec a new name to search {spec.objective.metrics}"
            )
    search = open_search(spec, root, create=True)
    write_tune_file(root, spec, spec_path)
    if spec.enqueue:
        with ClaimLock(root, spec.name):
            for params in spec.enqueue:
                search.study.enqueue_trial(params, skip_if_exists=True)
    return search


# ----------------------------------------------------------------------------------------------
# Trial bookkeeping


class ClaimLock:
    """Serialises zombie reaping and trial claims across workers (an O_EXCL lock file, NFS-safe)."""

    def __init__(self, root: Path | str, name: str):
        path = study_dir(root, name) / CLAIM_LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = JournalFileOpenLock(str(path.with_suffix("")), grace_period=60)  # it appends .lock

    def __enter__(self) -> ClaimLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """COMPLETE, PRUNED and RUNNING trials use up n_trials; a FAIL does unless it was retried."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get(RETRIED_ATTR, False)


def budget_used(study: optuna.Study) -> int:
    return sum(counts_toward_budget(trial) for trial in study.get_trials(deepcopy=False))


def trial_run_id(trial: FrozenTrial) -> str:
    return trial.user_attrs.get(RUN_ID_ATTR) or f"trial{trial.number:04d}"


def write_trial_file(run_dir: Path, study: str, number: int, state: str, params: dict[str, Any],
                     values: list[float] | None, run_id: str, reason: str | None = None) -> None:
    """The trial's record in its run folder. A retry is a new trial in the same folder: the records
    of earlier trials (the failed attempts) move to ``earlier_attempts``, never overwritten."""
    path = Path(run_dir) / TRIAL_FILE
    try:
        previous = read_json(path)
    except (FileNotFoundError, ValueError):
        previous = None
    earlier = list(previous.get("earlier_attempts") or []) if isinstance(previous, dict) else []
    if isinstance(previous, dict) and previous.get("trial_number") != number:
        earlier.append({key: value for key, value in previous.items() if key != "earlier_attempts"})
    record = {"study": study, "trial_number": number, "state": state, "params": params, "values": values,
              "run_id": run_id, "updated": time.time(), "attempt": len(earlier) + 1, "earlier_attempts": earlier}
    if reason:
        record["reason"] = reason
    atomic_write_json(path, record)


def zombie_reason(trial: FrozenTrial, root: Path | str, spec: TuneSpec, now: float | None = None) -> str | None:
    """Why a RUNNING trial's worker is gone, or None while it looks alive."""
    now = time.time() if now is None else now
    host, pid = trial.user_attrs.get(HOST_ATTR), trial.user_attrs.get(PID_ATTR)
    if host == socket.gethostname() and pid:
        # On this host the pid answers exactly; the heartbeat is for workers on other nodes.
        return None if pid_alive(int(pid)) else f"worker pid {pid} on {host} is gone"
    # A retry resumes the run directory of a dead attempt, whose heartbeat is old until the new
    # attempt's trainer starts: the trial's own start bounds the age.
    ages = [heartbeat_age_s(study_dir(root, spec.name) / trial_run_id(trial))]
    if trial.datetime_start is not None:
        ages.append(now - trial.datetime_start.timestamp())
    age = min((a for a in ages if a is not None), default=None)
    if age is not None and age > spec.zombie_after_s:
        return f"run heartbeat is {age:.0f} s old (zombie_after_s = {spec.zombie_after_s:g})"
    return None


def fail_trial(search: Search, trial: FrozenTrial, reason: str, retry: bool) -> bool:
    """Mark a RUNNING trial FAIL; with ``retry`` enqueue it again (same params, run dir, intermediate
    values), following RetryFailedTrialCallback's system attrs. Returns whether it was retried."""
    spec, storage = search.spec, search.storage
    trial_id = search.trial_id(trial.number)
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    retry = retry and len(history) <= spec.max_retry
    storage.set_trial_user_attr(trial_id, REASON_ATTR, reason)
    storage.set_trial_user_attr(trial_id, RETRIED_ATTR, retry)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
    run_id = trial_run_id(trial)
    write_trial_file(study_dir(search.root, spec.name) / run_id, spec.name, trial.number, "FAIL", trial.params, None,
                     run_id, reason)
    if retry:
        dropped = (HOST_ATTR, PID_ATTR, JOB_ATTR, REASON_ATTR, RETRIED_ATTR)
        keep = {k: v for k, v in trial.user_attrs.items() if k not in dropped}
        search.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=keep | {RUN_ID_ATTR: run_id},
            system_attrs={"failed_trial": history[0], "retry_history": history},
            intermediate_values=dict(trial.intermediate_values),
        ))
    return retry


def reap_zombies(search: Search) -> list[int]:
    """Fail and retry the RUNNING trials whose worker died. Call under the claim lock."""
    reaped = []
    for trial in search.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = zombie_reason(trial, search.root, search.spec)
        if reason:
            fail_trial(search, trial, f"zombie: {reason}", retry=True)
            reaped.append(trial.number)
    return reaped


def claim_trial(search: Search) -> optuna.Trial | None:
    """Under the claim lock: reap zombies, then ask for a trial if the budget is not used up."""
    spec, study = search.spec, search.study
    with ClaimLock(search.root, spec.name):
        reap_zombies(search)
        if budget_used(study) >= spec.n_trials:
            return None
        study.sampler = build_sampler(spec, trial_number=len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        trial.set_user_attr(RUN_ID_ATTR, trial_run_id(search.frozen(trial.number)))
        trial.set_user_attr(HOST_ATTR, socket.gethostname())
        trial.set_user_attr(PID_ATTR, os.getpid())
        trial.set_user_attr(JOB_ATTR, current_job_id())
        return trial


# ----------------------------------------------------------------------------------------------
# Summaries


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = Counter(trial.state.name for trial in study.get_trials(deepcopy=False))
    return dict(sorted(counts.items()))


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto front (several), best first by the first value."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.values[0])


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": trial.params,
        "run_id": trial_run_id(trial),
        "reason": trial.user_attrs.get(REASON_ATTR),
    }


def study_summary(root: Path | str, name: str) -> dict[str, Any]:
    spec = stored_spec(root, name)
    study = load_study(spec, root)
    return {
        "study": name,
        "storage": read_tune_file(root, name).get("storage"),
        "n_trials": spec.n_trials,
        "metrics": spec.objective.metrics,
        "directions": spec.objective.resolved_directions(),
        "counts": state_counts(study),
        "budget_used": budget_used(study),
        "best": [trial_summary(t) for t in best_trials(study)],
    }


def best_run_config(root: Path | str, name: str, trial_number: int | None = None) -> tuple[dict[str, Any], FrozenTrial]:
    """The run settings of the best trial (or ``trial_number``), ready for ``cmscale train``."""
    spec = stored_spec(root, name)
    study = load_study(spec, root)
    if trial_number is None:
        best = best_trials(study)
        if not best:
            raise TuneError(f"study {name!r} has no complete trial yet")
        trial = best[0]
    else:
        matching = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
        if not matching:
            raise TuneError(f"study {name!r} has no trial {trial_number}")
        trial = matching[0]
    config = _trial_config(root, name, trial) or spec.run_config(trial.params)
    return _drop_none(config.model_dump(mode="json", exclude={"run_id", "sweep"})), trial


def _trial_config(root: Path | str, name: str, trial: FrozenTrial) -> RunConfig | None:
    """The settings the trial's run trained with, from its config.json (None before it started):
    what ran, even when the study's spec changed since (``tune run --new-version``)."""
    path = study_dir(root, name) / trial_run_id(trial) / CONFIG_FILE
    try:
        written = read_json(path)
        return RunConfig.model_validate({k: v for k, v in written.items() if k in RunConfig.model_fields})
    except (OSError, ValueError):
        return None


def _drop_none(value: Any) -> Any:
    """TOML has no null: leave unset optional settings out (they take their defaults)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


__all__ = [
    "ClaimLock", "Search", "best_run_config", "best_trials", "budget_used", "claim_trial", "create_study",
    "fail_trial", "load_study", "open_search", "pruning_note", "reap_zombies", "state_counts", "study_summary",
    "trial_run_id", "write_trial_file",
]
