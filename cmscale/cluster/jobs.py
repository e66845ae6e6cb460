"""The callables that submitit runs: :class:`TrainJob` (one run) and :class:`PackJob` (several in one process).

On USR2 (a time limit or a preemption) the trainer stops at the next step boundary with a
checkpoint, then hands the signal to submitit, which calls the job's :meth:`checkpoint`: it marks
the run requeued and returns the same job; the requeued job resumes from the newest checkpoint on
disk, never from state pickled at submission.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit
from pydantic import ValidationError

from cmscale.config import RunConfig, format_validation_error
from cmscale.rundir import DONE_STATE_KEY, RunState, write_status
from cmscale.train import record_failure, save_active_run, train

JobArgs = tuple[dict[str, Any], str, int | None]  # (config dict, run directory, the plan's iteration count)


class TrainJob(submitit.helpers.Checkpointable):
    """``TrainJob()(config_dict, run_dir, iterations)``: validate the config and train (or resume) the run."""

    def __call__(self, config_dict: dict[str, Any], run_dir: str, iterations: int | None = None) -> dict[str, Any]:
        try:
            config = RunConfig.model_validate(config_dict)
        except ValidationError as error:
            reason = format_validation_error("start-up failed: the run's config", error)
            record_failure(Path(run_dir), reason, "start-up")
            raise
        return train(config, Path(run_dir), iterations=iterations, record_failures=True)

    def checkpoint(self, config_dict: dict[str, Any], run_dir: str,
                   iterations: int | None = None) -> submitit.helpers.DelayedSubmission:
        trainer = save_active_run()
        if trainer is not None and trainer.is_writer:
            write_status(Path(run_dir), RunState.REQUEUED, step=trainer.step)
        return submitit.helpers.DelayedSubmission(TrainJob(), config_dict, run_dir, iterations)


class PackJob(submitit.helpers.Checkpointable):
    """Several runs in one job, one after the other in one process: ``PackJob()(runs)`` with
    ``runs`` a list of ``(config_dict, run_dir, iterations)``, as :class:`TrainJob` takes them.

    Short runs then share one interpreter start (torch alone takes seconds to import) and one array
    task. Each run keeps its own folder, heartbeat, checkpoints and status. A run that is done is
    skipped (``train`` returns its done.json), so a requeued pack resumes where it stopped. A run
    that raises is recorded as failed in its done.json (with the traceback) and the pack goes on; a
    run stopped by a signal ends the pack (its job is being requeued or cancelled).
    """

    def __call__(self, runs: list[JobArgs]) -> list[dict[str, Any]]:
        results = []
        for config_dict, run_dir, iterations in runs:
            try:
                result = TrainJob()(config_dict, run_dir, iterations)
            except Exception as error:  # noqa: BLE001 - one bad run must not take its pack down
                result = record_failure(Path(run_dir), f"{type(error).__name__}: {error}", None, with_traceback=True)
            results.append(result)
            if result.get(DONE_STATE_KEY) == RunState.INTERRUPTED:
                break
        return results

    def checkpoint(self, runs: list[JobArgs]) -> submitit.helpers.DelayedSubmission:
        trainer = save_active_run()
        if trainer is not None and trainer.is_writer:
            write_status(trainer.run_dir, RunState.REQUEUED, step=trainer.step)
        return submitit.helpers.DelayedSubmission(PackJob(), runs)
