"""Optuna searches whose trials are ordinary cmscale runs, pulled by workers on SLURM or locally.

On disk, under the results root::

    <root>/<study>/tune.json        the validated spec, the storage URL, n_trials, submitted jobs
    <root>/<study>/optuna.journal   Optuna's JournalStorage (the default storage; any URL is accepted)
    <root>/<study>/claim.lock       held while a worker reaps zombies and claims a trial
    <root>/<study>/<run_id>/        one run per trial (config.json, metrics.jsonl, ..., trial.json)

Every worker loops: under the claim lock it fails the zombie trials (RUNNING, but their worker is
gone: its pid is dead on this host, or the run's heartbeat is older than ``zombie_after_s``) and
enqueues each again with the same parameters and run directory, so the retry resumes from the
run's newest checkpoint; then it counts the trials that use up the budget (COMPLETE, PRUNED,
RUNNING, and FAIL not retried) and asks for a new trial only while that count is below
``n_trials``. So a study killed and started again ends with exactly ``n_trials`` such trials.
The lock is an ``open(O_CREAT | O_EXCL)`` lock file (Optuna's JournalFileOpenLock), which is
safe on NFS, unlike symlink or fcntl locks.

Each trial reports its intermediate FID (per-mille of the run's budget as the step) so the pruner
can stop it; a pruned run ends with status ``pruned`` in done.json and PRUNED in Optuna.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import submitit
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from cmscale.rundir import (
    CONFIG_FILE,
    DONE_FILE,
    METRICS_FILE,
    Heartbeat,
    atomic_write_json,
    heartbeat_age_s,
    pid_alive,
    read_json,
    read_metrics,
)
from cmscale.sweep.tune_spec import (
    FID_METRICS,
    METRIC_PATTERN,
    SAMPLER_STEPS_PARAM,
    CategoricalParam,
    FloatParam,
    IntParam,
    TuneSpec,
    grid_values,
)

TUNE_FILE = "tune.json"
JOURNAL_FILE = "optuna.journal"
CLAIM_LOCK = "claim.lock"
TRIAL_FILE = "trial.json"
SUBMITIT_DIR = "_submitit"
PROGRESS_STEPS = 1000  # intermediate values are reported at per-mille of the run's budget

# user attrs kept on each Optuna trial
RUN_ID_ATTR = "run_id"
HOST_ATTR = "worker_host"
PID_ATTR = "worker_pid"
JOB_ATTR = "worker_job_id"
RETRIED_ATTR = "retried"
REASON_ATTR = "fail_reason"


class TuneError(RuntimeError):
    """A study cannot be used as asked (missing, or its storage does not open)."""


# ----------------------------------------------------------------------------------------------
# Storage and study


def study_dir(root: Path | str, name: str) -> Path:
    return Path(root) / name


def default_storage_path(root: Path | str, name: str) -> Path:
    return study_dir(root, name).resolve() / JOURNAL_FILE


def open_storage(url: str | None, root: Path | str, name: str) -> BaseStorage | str:
    """The study's storage: a JournalStorage file with an open(O_EXCL) lock, or the URL given."""
    if url:
        return optuna.storages.get_storage(url)
    path = default_storage_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock file is optuna.journal.lock, the name optuna-dashboard's symlink lock also takes.
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


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
        return optuna.pruners.MedianPruner(n_startup_trials=options.n_startup_trials, n_warmup_steps=options.n_warmup_steps)
    return optuna.pruners.HyperbandPruner(min_resource=options.min_resource, max_resource=PROGRESS_STEPS,
                                          reduction_factor=options.reduction_factor)


def pruning_note(spec: TuneSpec) -> str | None:
    """Why pruning is off although a pruner was asked for (Optuna cannot prune multi-objective)."""
    if spec.pruner.name != "none" and spec.objective.multi:
        return (f"pruning is off: the study has {len(spec.objective.metrics)} objectives "
                f"({', '.join(spec.objective.metrics)}) and Optuna prunes single-objective studies only; "
                f"pruner {spec.pruner.name!r} is ignored and every trial runs its full budget")
    return None


def load_study(spec: TuneSpec, root: Path | str, storage: BaseStorage | str | None = None, create: bool = False) -> optuna.Study:
    storage = storage if storage is not None else open_storage(spec.storage, root, spec.name)
    kwargs = dict(study_name=spec.name, storage=storage, sampler=build_sampler(spec), pruner=build_pruner(spec))
    if create:
        return optuna.create_study(directions=spec.objective.resolved_directions(), load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)


def write_tune_file(root: Path | str, spec: TuneSpec, spec_path: str, extra: dict[str, Any] | None = None) -> None:
    path = study_dir(root, spec.name) / TUNE_FILE
    previous = read_json(path) if path.is_file() else {}
    atomic_write_json(path, previous | {
        "study": spec.name,
        "spec_path": spec_path,
        "spec": spec.model_dump(mode="json"),
        "storage": spec.storage or str(default_storage_path(root, spec.name)),
        "n_trials": spec.n_trials,
        "updated": time.time(),
    } | (extra or {}))


def read_tune_file(root: Path | str, name: str) -> dict[str, Any]:
    path = study_dir(root, name) / TUNE_FILE
    if not path.is_file():
        raise TuneError(f"no study {name!r} under {root} ({path} missing); start it with `cmscale tune run SPEC`")
    return read_json(path)


def stored_spec(root: Path | str, name: str) -> TuneSpec:
    return TuneSpec.model_validate(read_tune_file(root, name)["spec"])


def create_study(spec: TuneSpec, root: Path | str, spec_path: str = "") -> optuna.Study:
    """Create the study (or load it: re-running continues it) and enqueue the spec's fixed trials once."""
    tune_file = study_dir(root, spec.name) / TUNE_FILE
    if tune_file.is_file():
        before = TuneSpec.model_validate(read_json(tune_file)["spec"]).objective
        if (before.metrics, before.resolved_directions()) != (spec.objective.metrics, spec.objective.resolved_directions()):
            raise TuneError(
                f"study {spec.name!r} exists with objective {before.metrics} {before.resolved_directions()}; "
                f"a study keeps its objective, so give this spec a new name to search {spec.objective.metrics}")
    study = load_study(spec, root, create=True)
    write_tune_file(root, spec, spec_path)
    if spec.enqueue:
        with ClaimLock(root, spec.name):
            for params in spec.enqueue:
                study.enqueue_trial(params, skip_if_exists=True)
    return study


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


def slurm_job_id() -> str | None:
    """This worker's SLURM job id as submitit names it (``ARRAY_TASK`` inside an array)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


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


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str, spec: TuneSpec, root: Path | str, retry: bool) -> bool:
    """Mark a RUNNING trial FAIL; with ``retry`` enqueue it again (same params, run dir, intermediate
    values), following RetryFailedTrialCallback's system attrs. Returns whether it was retried."""
    storage = study._storage
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    retry = retry and len(history) <= spec.max_retry
    storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
    storage.set_trial_user_attr(trial._trial_id, RETRIED_ATTR, retry)
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    run_id = trial_run_id(trial)
    write_trial_file(study_dir(root, spec.name) / run_id, spec.name, trial.number, "FAIL", trial.params, None, run_id, reason)
    if retry:
        keep = {k: v for k, v in trial.user_attrs.items() if k not in (HOST_ATTR, PID_ATTR, JOB_ATTR, REASON_ATTR, RETRIED_ATTR)}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=keep | {RUN_ID_ATTR: run_id},
            system_attrs={"failed_trial": history[0], "retry_history": history},
            intermediate_values=dict(trial.intermediate_values),
        ))
    return retry


def reap_zombies(study: optuna.Study, spec: TuneSpec, root: Path | str) -> list[int]:
    """Fail and retry the RUNNING trials whose worker died. Call under the claim lock."""
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = zombie_reason(trial, root, spec)
        if reason:
            fail_trial(study, trial, f"zombie: {reason}", spec, root, retry=True)
            reaped.append(trial.number)
    return reaped


def claim_trial(study: optuna.Study, spec: TuneSpec, root: Path | str) -> optuna.Trial | None:
    """Under the claim lock: reap zombies, then ask for a trial if the budget is not used up."""
    with ClaimLock(root, spec.name):
        reap_zombies(study, spec, root)
        if budget_used(study) >= spec.n_trials:
            return None
        study.sampler = build_sampler(spec, trial_number=len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        frozen = study._storage.get_trial(trial._trial_id)
        trial.set_user_attr(RUN_ID_ATTR, trial_run_id(frozen))
        trial.set_user_attr(HOST_ATTR, socket.gethostname())
        trial.set_user_attr(PID_ATTR, os.getpid())
        trial.set_user_attr(JOB_ATTR, slurm_job_id())
        return trial


# ----------------------------------------------------------------------------------------------
# Objective


def suggest_params(trial: optuna.Trial, spec: TuneSpec) -> dict[str, Any]:
    """Suggest the method first, then the parameters whose ``methods`` condition holds."""
    params: dict[str, Any] = {}
    order = sorted(spec.space, key=lambda name: name != "method")
    for name in order:
        param = spec.space[name]
        method = params.get("method", spec.base.get("method"))
        if param.methods is not None and method not in param.methods:
            continue
        if isinstance(param, CategoricalParam):
            params[name] = trial.suggest_categorical(name, param.choices)
        elif isinstance(param, IntParam):
            params[name] = trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
        elif isinstance(param, FloatParam):
            params[name] = trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)
    return params


def primary_steps(config_json: dict[str, Any], params: dict[str, Any]) -> int:
    """The sampler step count behind the ``fid`` and ``nfe`` metrics: the trial's first one."""
    if SAMPLER_STEPS_PARAM in params:
        return int(params[SAMPLER_STEPS_PARAM])
    if config_json.get("method") == "edm":
        return int(config_json["edm"]["heun_steps"][0])
    return int(config_json["eval"]["cm_steps"][0])


def metric_from_rows(metric: str, rows: list[dict[str, Any]], config_json: dict[str, Any], params: dict[str, Any]) -> float | None:
    """A FID/NFE metric from one eval point's rows (None when that sampler step count is absent)."""
    match = METRIC_PATTERN.match(metric)
    steps = int(match.group("steps")) if match and match.group("steps") else primary_steps(config_json, params)
    row = next((r for r in rows if int(r.get("sampler_steps", -1)) == steps), None)
    if row is None:
        return None
    return float(row["nfe"] if metric == "nfe" else row["fid"])


def objective_values(spec: TuneSpec, run_dir: Path, params: dict[str, Any]) -> list[float]:
    """The objective metrics at the end of the run's budget, from its metrics.jsonl and done.json."""
    config_json = read_json(run_dir / CONFIG_FILE)
    done = read_json(run_dir / DONE_FILE)
    evals = read_metrics(run_dir / METRICS_FILE, kind="eval")
    final_step = max((int(row["step"]) for row in evals), default=None)
    final_rows = [row for row in evals if int(row["step"]) == final_step]
    values = []
    for metric in spec.objective.metrics:
        if metric == "train_flops":
            value = float(done["train_flops"])
        elif metric == "params":
            value = float(config_json["params"])
        elif metric == "wall_s":
            value = float(done["wall_s"])
        else:
            if final_step is None or final_step < int(done["final_step"]):
                raise ValueError(f"no eval at the end of the run (step {done['final_step']}) in {run_dir / METRICS_FILE}")
            value = metric_from_rows(metric, final_rows, config_json, params)
            if value is None:
                raise ValueError(f"metric {metric!r} has no eval row at step {final_step} in {run_dir / METRICS_FILE}")
        if not math.isfinite(value):
            raise ValueError(f"metric {metric!r} is {value}")
        values.append(value)
    return values


# ----------------------------------------------------------------------------------------------
# The worker


class WorkerStopped(Exception):
    """The worker got a stop signal while a trial ran; the trial was failed and enqueued again."""


def _tell(study: optuna.Study, trial: optuna.Trial, **kwargs: Any) -> bool:
    """Tell the outcome unless another worker already failed the trial as a zombie."""
    if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        return False
    try:
        study.tell(trial, **kwargs)
    except RuntimeError:
        # GridSampler calls study.stop() once its grid is covered, which raises outside optimize();
        # the outcome is stored before that.
        if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            raise
    return True


def run_trial(study: optuna.Study, trial: optuna.Trial, spec: TuneSpec, root: Path) -> str:
    """Run one claimed trial as a cmscale run; returns its final Optuna state name."""
    run_id = trial_run_id(study._storage.get_trial(trial._trial_id))
    # Beat from the claim on (the trainer's own heartbeat starts only once the run is built), so a
    # slow start is not taken for a dead worker.
    with Heartbeat(study_dir(root, spec.name) / run_id, spec.zombie_after_s / 4):
        return _run_trial(study, trial, spec, root, run_id)


def _run_trial(study: optuna.Study, trial: optuna.Trial, spec: TuneSpec, root: Path, run_id: str) -> str:
    from cmscale.train import train

    run_dir = study_dir(root, spec.name) / run_id
    params = suggest_params(trial, spec)
    try:
        config = spec.run_config(params, sweep=spec.name, run_id=run_id)
    except ValueError as error:
        return _finish_failed(study, trial, spec, root, params, run_id, f"invalid run config for these params: {error}")
    write_trial_file(run_dir, spec.name, trial.number, "RUNNING", params, None, run_id)
    single = not spec.objective.multi
    fid_metric = spec.objective.metrics[0]

    def on_eval(rows: list[dict[str, Any]]) -> bool:
        if not single or not rows or not FID_METRICS.match(fid_metric):
            return False
        config_json = read_json(run_dir / CONFIG_FILE)
        value = metric_from_rows(fid_metric, rows, config_json, params)
        if value is None or not math.isfinite(value):
            return False
        progress = round(PROGRESS_STEPS * int(rows[0]["step"]) / int(config_json["budget_iters_resolved"]))
        if progress in study._storage.get_trial(trial._trial_id).intermediate_values:
            return False  # a retried trial resumed past a point it had already reported
        trial.report(value, progress)
        return spec.pruning and trial.should_prune()

    try:
        done = train(config, run_dir, on_eval=on_eval)
    except (KeyboardInterrupt, SystemExit):
        fail_trial(study, study._storage.get_trial(trial._trial_id), "worker stopped (interrupt)", spec, root, retry=True)
        raise
    except Exception as error:  # noqa: BLE001 - the trial fails; the worker goes on to the next one
        return _finish_failed(study, trial, spec, root, params, run_id, f"{type(error).__name__}: {error}")
    status = done.get("status")
    if status == "interrupted":
        fail_trial(study, study._storage.get_trial(trial._trial_id), f"run interrupted ({done.get('reason')})", spec, root, retry=True)
        raise WorkerStopped(done.get("reason"))
    if status == "pruned":
        if not _tell(study, trial, state=TrialState.PRUNED):
            return "FAIL (taken for a zombie)"
        write_trial_file(run_dir, spec.name, trial.number, "PRUNED", params, None, run_id, done.get("reason"))
        return "PRUNED"
    if status != "done":
        return _finish_failed(study, trial, spec, root, params, run_id, f"run {status}: {done.get('reason')}")
    try:
        values = objective_values(spec, run_dir, params)
    except (ValueError, KeyError, FileNotFoundError) as error:
        return _finish_failed(study, trial, spec, root, params, run_id, f"objective: {error}")
    if not _tell(study, trial, values=values):
        return "FAIL (taken for a zombie)"
    write_trial_file(run_dir, spec.name, trial.number, "COMPLETE", params, values, run_id)
    return "COMPLETE"


def _finish_failed(study, trial, spec: TuneSpec, root: Path, params, run_id: str, reason: str) -> str:
    if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        return "FAIL (taken for a zombie)"
    trial.set_user_attr(REASON_ATTR, reason)
    trial.set_user_attr(RETRIED_ATTR, False)
    study.tell(trial, state=TrialState.FAIL)
    write_trial_file(study_dir(root, spec.name) / run_id, spec.name, trial.number, "FAIL", params, None, run_id, reason)
    return "FAIL"


def run_worker(spec_dict: dict[str, Any], root: str, worker_index: int = 0) -> dict[str, Any]:
    """Pull trials until the study has ``n_trials`` that count; returns {trial number: state}."""
    spec = TuneSpec.model_validate(spec_dict)
    root_path = Path(root)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(spec, root_path)
    outcomes: dict[int, str] = {}
    while True:
        trial = claim_trial(study, spec, root_path)
        if trial is None:
            break
        try:
            outcomes[trial.number] = run_trial(study, trial, spec, root_path)
        except WorkerStopped:
            outcomes[trial.number] = "FAIL (retried)"
            break
    return {"worker": worker_index, "host": socket.gethostname(), "pid": os.getpid(), "trials": outcomes}


class TuneWorker(submitit.helpers.Checkpointable):
    """The submitit callable of one worker. On preemption the running trial checkpoints its run,
    and the requeued worker finds it (dead pid or stale heartbeat), retries it, and resumes it."""

    def __call__(self, spec_dict: dict[str, Any], root: str, worker_index: int) -> dict[str, Any]:
        return run_worker(spec_dict, root, worker_index)

    def checkpoint(self, spec_dict: dict[str, Any], root: str, worker_index: int) -> submitit.helpers.DelayedSubmission:
        from cmscale import train as train_module

        if train_module._ACTIVE is not None:
            train_module._ACTIVE.save()
        return submitit.helpers.DelayedSubmission(TuneWorker(), spec_dict, root, worker_index)


# ----------------------------------------------------------------------------------------------
# Launch


def launch_workers(spec: TuneSpec, root: Path, executor: str, workers: int, profile_name: str | None = None) -> list[Any]:
    """Start ``workers`` workers: a SLURM job array, local processes, or (debug) in this process.

    Returns the submitit jobs (for debug: the workers' result dicts).
    """
    root = Path(root).resolve()
    spec_dict = spec.model_dump(mode="json")
    folder = study_dir(root, spec.name) / SUBMITIT_DIR / "%j"
    indices = list(range(workers))
    if executor == "debug":
        return [run_worker(spec_dict, str(root), index) for index in indices]
    if executor == "slurm":
        from cmscale.sweep.profiles import load_profile

        profile = load_profile(profile_name or spec.executor.profile)
        slurm = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=profile.max_num_timeout)
        slurm.update_parameters(name=f"cmscale-tune-{spec.name}", **profile.submitit_parameters())
        slurm.update_parameters(slurm_array_parallelism=min(workers, profile.array_parallelism))
        jobs = slurm.map_array(TuneWorker(), [spec_dict] * workers, [str(root)] * workers, indices)
    else:
        # Split the cores between the workers so parallel trials do not oversubscribe.
        os.environ["CMSCALE_NUM_THREADS"] = os.environ.get("CMSCALE_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // workers))
        local = submitit.LocalExecutor(folder=folder)
        local.update_parameters(timeout_min=spec.executor.timeout_min)
        jobs = local.map_array(TuneWorker(), [spec_dict] * workers, [str(root)] * workers, indices)
    write_tune_file(root, spec, read_tune_file(root, spec.name).get("spec_path", ""), {
        "executor": executor,
        "jobs": [str(job.job_id) for job in jobs],
        "workers": workers,
        "submitted": time.time(),
    })
    return jobs


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
    config = spec.run_config(trial.params).model_dump(mode="json", exclude={"run_id", "sweep"})
    return _drop_none(config), trial


def _drop_none(value: Any) -> Any:
    """TOML has no null: leave unset optional settings out (they take their defaults)."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


__all__ = [
    "TuneError", "TuneWorker", "best_run_config", "best_trials", "budget_used", "claim_trial", "create_study",
    "default_storage_path", "launch_workers", "load_study", "objective_values", "open_storage", "pruning_note",
    "reap_zombies", "run_trial", "run_worker", "state_counts", "study_summary",
]
