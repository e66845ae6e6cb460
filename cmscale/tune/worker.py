"""Search workers: each pulls trials from the study (:mod:`cmscale.tune.study`) and runs each as an
ordinary cmscale run, on SLURM (a job array), as local processes, or in this process (debug).

Each trial reports its intermediate FID (per-mille of the run's budget as the step) so the pruner
can stop it; a pruned run ends with status ``pruned`` in done.json and PRUNED in Optuna.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
import submitit
from optuna.trial import TrialState

from cmscale.cluster.executors import (
    THREADS_ENV,
    cores_per_job,
    detaches,
    in_process,
    make_executor,
)
from cmscale.rundir import (
    CONFIG_FILE,
    DONE_FILE,
    DONE_STATE_KEY,
    ITERATIONS_KEY,
    METRICS_FILE,
    SUBMITIT_DIR,
    Heartbeat,
    RunState,
    read_json,
    read_metrics,
)
from cmscale.tune.spec import (
    FID_METRICS,
    METRIC_PATTERN,
    SAMPLER_STEPS_PARAM,
    CategoricalParam,
    FloatParam,
    IntParam,
    TuneSpec,
)
from cmscale.tune.storage import read_tune_file, study_dir, write_tune_file
from cmscale.tune.study import (
    PROGRESS_STEPS,
    REASON_ATTR,
    RETRIED_ATTR,
    Search,
    claim_trial,
    fail_trial,
    open_search,
    trial_run_id,
    write_trial_file,
)

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


def metric_from_rows(
    metric: str, rows: list[dict[str, Any]], config_json: dict[str, Any], params: dict[str, Any]
) -> float | None:
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
                raise ValueError(
                    f"no eval at the end of the run (step {done['final_step']}) in {run_dir / METRICS_FILE}"
                )
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


def _tell(search: Search, trial: optuna.Trial, **kwargs: Any) -> bool:
    """Tell the outcome unless another worker already failed the trial as a zombie."""
    if search.frozen(trial.number).state != TrialState.RUNNING:
        return False
    try:
        search.study.tell(trial, **kwargs)
    except RuntimeError:
        # GridSampler calls study.stop() once its grid is covered, which raises outside optimize();
        # the outcome is stored before that.
        if search.frozen(trial.number).state == TrialState.RUNNING:
            raise
    return True


def run_trial(search: Search, trial: optuna.Trial) -> str:
    """Run one claimed trial as a cmscale run; returns its final Optuna state name."""
    run_id = trial_run_id(search.frozen(trial.number))
    # Beat from the claim on (the trainer's own heartbeat starts only once the run is built), so a
    # slow start is not taken for a dead worker.
    with Heartbeat(study_dir(search.root, search.spec.name) / run_id, search.spec.zombie_after_s / 4):
        return _run_trial(search, trial, run_id)


def _run_trial(search: Search, trial: optuna.Trial, run_id: str) -> str:
    from cmscale.train import train

    spec = search.spec
    run_dir = study_dir(search.root, spec.name) / run_id
    params = suggest_params(trial, spec)

    def failed(reason: str) -> str:
        return _finish_failed(search, trial, params, run_id, reason)

    try:
        config = spec.run_config(params, sweep=spec.name, run_id=run_id)
    except ValueError as error:
        return failed(f"invalid run config for these params: {error}")
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
        progress = round(PROGRESS_STEPS * int(rows[0]["step"]) / int(config_json[ITERATIONS_KEY]))
        if progress in search.frozen(trial.number).intermediate_values:
            return False  # a retried trial resumed past a point it had already reported
        trial.report(value, progress)
        return spec.pruning and trial.should_prune()

    try:
        done = train(config, run_dir, on_eval=on_eval)
    except (KeyboardInterrupt, SystemExit):
        fail_trial(search, search.frozen(trial.number), "worker stopped (interrupt)", retry=True)
        raise
    except Exception as error:  # noqa: BLE001 - the trial fails; the worker goes on to the next one
        return failed(f"{type(error).__name__}: {error}")
    status = done.get(DONE_STATE_KEY)
    if status == RunState.INTERRUPTED:
        fail_trial(search, search.frozen(trial.number), f"run interrupted ({done.get('reason')})", retry=True)
        raise WorkerStopped(done.get("reason"))
    if status == RunState.PRUNED:
        if not _tell(search, trial, state=TrialState.PRUNED):
            return "FAIL (taken for a zombie)"
        write_trial_file(run_dir, spec.name, trial.number, "PRUNED", params, None, run_id, done.get("reason"))
        return "PRUNED"
    if status != RunState.DONE:
        return failed(f"run {status}: {done.get('reason')}")
    try:
        values = objective_values(spec, run_dir, params)
    except (ValueError, KeyError, FileNotFoundError) as error:
        return failed(f"objective: {error}")
    if not _tell(search, trial, values=values):
        return "FAIL (taken for a zombie)"
    write_trial_file(run_dir, spec.name, trial.number, "COMPLETE", params, values, run_id)
    return "COMPLETE"


def _finish_failed(search: Search, trial: optuna.Trial, params: dict[str, Any], run_id: str, reason: str) -> str:
    if search.frozen(trial.number).state != TrialState.RUNNING:
        return "FAIL (taken for a zombie)"
    trial.set_user_attr(REASON_ATTR, reason)
    trial.set_user_attr(RETRIED_ATTR, False)
    search.study.tell(trial, state=TrialState.FAIL)
    name = search.spec.name
    write_trial_file(study_dir(search.root, name) / run_id, name, trial.number, "FAIL", params, None, run_id, reason)
    return "FAIL"


def run_worker(spec_dict: dict[str, Any], root: str, worker_index: int = 0) -> dict[str, Any]:
    """Pull trials until the study has ``n_trials`` that count; returns {trial number: state}."""
    spec = TuneSpec.model_validate(spec_dict)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = open_search(spec, Path(root))
    outcomes: dict[int, str] = {}
    while True:
        trial = claim_trial(search)
        if trial is None:
            break
        try:
            outcomes[trial.number] = run_trial(search, trial)
        except WorkerStopped:
            outcomes[trial.number] = "FAIL (retried)"
            break
    return {"worker": worker_index, "host": socket.gethostname(), "pid": os.getpid(), "trials": outcomes}


class TuneWorker(submitit.helpers.Checkpointable):
    """The submitit callable of one worker. On preemption the running trial checkpoints its run,
    and the requeued worker finds it (dead pid or stale heartbeat), retries it, and resumes it."""

    def __call__(self, spec_dict: dict[str, Any], root: str, worker_index: int) -> dict[str, Any]:
        return run_worker(spec_dict, root, worker_index)

    def checkpoint(self, spec_dict: dict[str, Any], root: str,
                   worker_index: int) -> submitit.helpers.DelayedSubmission:
        from cmscale.train import save_active_run

        save_active_run()
        return submitit.helpers.DelayedSubmission(TuneWorker(), spec_dict, root, worker_index)


# ----------------------------------------------------------------------------------------------
# Launch


def launch_workers(spec: TuneSpec, root: Path, executor: str, workers: int,
                   profile_name: str | None = None) -> list[Any]:
    """Start ``workers`` workers: a SLURM job array, local processes, or (debug) in this process.

    Returns the submitit jobs (for debug: the workers' result dicts; they run here directly, not
    under submitit's DebugExecutor, whose debugger would stop a worker at a trial's error).
    """
    root = Path(root).resolve()
    spec_dict = spec.model_dump(mode="json")
    indices = list(range(workers))
    if in_process(executor):
        return [run_worker(spec_dict, str(root), index) for index in indices]
    profile = None
    if detaches(executor):  # a cluster: its profile says how
        from cmscale.cluster.profiles import load_profile

        profile = load_profile(profile_name or spec.executor.profile)
    else:
        # Split the cores between the workers so parallel trials do not oversubscribe.
        os.environ[THREADS_ENV] = os.environ.get(THREADS_ENV) or str(cores_per_job(workers))
    runner = make_executor(executor, study_dir(root, spec.name) / SUBMITIT_DIR / "%j", name=f"cmscale-tune-{spec.name}",
                           profile=profile, timeout_min=spec.executor.timeout_min,
                           array_parallelism=min(workers, profile.array_parallelism) if profile else None)
    jobs = runner.map_array(TuneWorker(), [spec_dict] * workers, [str(root)] * workers, indices)
    write_tune_file(root, spec, read_tune_file(root, spec.name).get("spec_path", ""), {
        "executor": executor,
        "jobs": [str(job.job_id) for job in jobs],
        "workers": workers,
        "submitted": time.time(),
    })
    return jobs


__all__ = ["TuneWorker", "WorkerStopped", "launch_workers", "objective_values", "run_trial", "run_worker"]
