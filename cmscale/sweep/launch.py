"""Launch planned runs through submitit: SLURM job arrays with dependencies, or local processes.

Bookkeeping lives on disk so that the launcher can die at any time:

    <root>/<sweep>/sweep.json          the plan (run ids, stages, dependencies, configs)
    <root>/<sweep>/<run_id>/job.json   how and when the run was last submitted (executor, job id)
    <root>/<sweep>/_submitit/          submitit's pickles and logs

On SLURM, stage 0 (teachers) goes as one array; students go as one array per teacher with an
``afterok`` dependency on that teacher's array task, so the launcher need not stay alive.
The local executor runs the same jobs as local processes, stage by stage, ``max_parallel`` at once.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from cmscale.rundir import atomic_write_json, read_json
from cmscale.sweep.plan import PlannedRun
from cmscale.sweep.profiles import Profile

SWEEP_FILE = "sweep.json"
JOB_FILE = "job.json"
SUBMITIT_DIR = "_submitit"


@dataclass
class LaunchReport:
    submitted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # run_id -> why
    sbatch_calls: int = 0
    arrays: list[dict[str, Any]] = field(default_factory=list)


def sweep_dir(root: Path, sweep: str) -> Path:
    return Path(root) / sweep


def write_sweep_file(root: Path, sweep: str, runs: list[PlannedRun], spec_path: str,
                     executor: str | None = None, profile: str | None = None) -> None:
    """The plan on disk; ``executor`` and ``profile`` are what ``relaunch`` reuses by default."""
    atomic_write_json(
        sweep_dir(root, sweep) / SWEEP_FILE,
        {
            "sweep": sweep,
            "spec_path": spec_path,
            "executor": executor,
            "profile": profile,
            "runs": [
                {
                    "run_id": run.run_id,
                    "stage": run.stage,
                    "depends_on": run.depends_on,
                    "iterations": run.iterations,
                    "flops_per_step": run.flops_per_step,
                    "config": run.config.model_dump(mode="json"),
                }
                for run in runs
            ],
        },
    )


def read_sweep_file(root: Path, sweep: str) -> dict[str, Any]:
    path = sweep_dir(root, sweep) / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no sweep {sweep!r} under {root} ({path} missing); launch it first with `cmscale sweep launch SPEC`")
    return read_json(path)


def read_job(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / JOB_FILE
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):
        return None


def _job_callable():
    from cmscale.train import TrainJob

    return TrainJob()


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cluster_max_array_size() -> int | None:
    """MaxArraySize from ``scontrol show config`` (task indices must be below it); None off-cluster."""
    try:
        output = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in output.splitlines():
        if line.strip().startswith("MaxArraySize"):
            try:
                return int(line.split("=", 1)[1].strip())
            except ValueError:
                return None
    return None


def _record_job(run: PlannedRun, root: Path, executor: str, job_id: str, array_job_id: str | None, task: int | None) -> None:
    run_dir = run.run_dir(root)
    previous = read_job(run_dir) or {}
    atomic_write_json(
        run_dir / JOB_FILE,
        {
            "executor": executor,
            "job_id": job_id,
            "array_job_id": array_job_id,
            "array_task": task,
            "submitted": time.time(),
            "attempt": int(previous.get("attempt", 0)) + 1,
        },
    )


class SlurmLauncher:
    """Submits arrays with submitit's SLURM executor. ``dry_run`` builds the sbatch files only."""

    def __init__(self, root: Path, sweep: str, profile: Profile, dry_run: bool = False,
                 on_progress: Callable[[int, int], None] | None = None):
        self.root = Path(root)
        self.sweep = sweep
        self.profile = profile
        self.dry_run = dry_run
        self.on_progress = on_progress  # (runs submitted so far, runs to submit)
        self._total = 0
        # Array task indices run 0..MaxArraySize-1, so an array holds at most MaxArraySize tasks.
        # A dry run asks the cluster too when one answers; otherwise SLURM's default (1001) holds.
        limits = [limit for limit in (profile.max_array_size, cluster_max_array_size()) if limit]
        self.max_array = min(limits) if limits else 1001

    def _executor(self) -> submitit.AutoExecutor:
        folder = sweep_dir(self.root, self.sweep) / SUBMITIT_DIR / "%j"
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=self.profile.max_num_timeout)
        executor.update_parameters(name=f"cmscale-{self.sweep}", **self.profile.submitit_parameters())
        return executor

    def submit_array(self, runs: list[PlannedRun], dependency: str | None, report: LaunchReport) -> list[str]:
        """Submit ``runs`` as arrays of at most MaxArraySize tasks; returns one job id per run."""
        job_ids: list[str] = []
        for chunk in _chunks(runs, self.max_array):
            report.sbatch_calls += 1
            if self.dry_run:
                fake = f"dryrun{report.sbatch_calls}"
                job_ids += [f"{fake}_{i}" for i in range(len(chunk))]
                report.arrays.append({"array_job_id": fake, "tasks": len(chunk), "dependency": dependency})
                continue
            executor = self._executor()
            extra = dict(self.profile.sbatch_extra)
            if dependency:
                extra |= {"dependency": dependency, "kill-on-invalid-dep": "yes"}
            executor.update_parameters(slurm_additional_parameters=extra)
            job_callable = _job_callable()
            with executor.batch():
                jobs = [executor.submit(job_callable, run.config.model_dump(mode="json"), str(run.run_dir(self.root))) for run in chunk]
            array_job_id = jobs[0].job_id.split("_")[0]
            report.arrays.append({"array_job_id": array_job_id, "tasks": len(chunk), "dependency": dependency})
            for task, (run, job) in enumerate(zip(chunk, jobs)):
                _record_job(run, self.root, "slurm", job.job_id, array_job_id, task)
                job_ids.append(job.job_id)
            if self.on_progress:
                self.on_progress(len(report.submitted) + len(job_ids), self._total)
        report.submitted += [run.run_id for run in runs]
        return job_ids

    def launch(self, runs: list[PlannedRun], report: LaunchReport, live_job_ids: dict[str, str]) -> None:
        """Teachers first as arrays; students grouped by their teacher, each group one array."""
        self._total = len(runs)
        teacher_job: dict[str, str] = dict(live_job_ids)
        teachers = [run for run in runs if run.stage == 0]
        if teachers:
            for run, job_id in zip(teachers, self.submit_array(teachers, None, report)):
                teacher_job[run.run_id] = job_id
        groups: dict[tuple[str, ...], list[PlannedRun]] = {}
        for run in runs:
            if run.stage > 0:
                pending = tuple(dep for dep in run.depends_on if dep in teacher_job)
                groups.setdefault(pending, []).append(run)
        for deps, group in groups.items():
            dependency = "afterok:" + ":".join(teacher_job[dep] for dep in deps) if deps else None
            self.submit_array(group, dependency, report)


class LocalLauncher:
    """Runs jobs as local processes through submitit's LocalExecutor, stage by stage.

    Local runs live as long as the launcher does; use the SLURM executor for fire-and-forget.
    Each job gets ``cores // max_parallel`` torch threads so parallel runs do not oversubscribe.
    """

    def __init__(self, root: Path, sweep: str, max_parallel: int, timeout_min: int, debug: bool = False,
                 on_finish: Callable[[PlannedRun, str], None] | None = None):
        self.root = Path(root)
        self.sweep = sweep
        self.max_parallel = 1 if debug else max_parallel
        self.timeout_min = timeout_min
        self.debug = debug
        self.on_finish = on_finish

    def _executor(self):
        folder = sweep_dir(self.root, self.sweep) / SUBMITIT_DIR / "%j"
        if self.debug:
            return submitit.DebugExecutor(folder=folder)
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=self.timeout_min)
        return executor

    def launch(self, runs: list[PlannedRun], report: LaunchReport, done: set[str]) -> None:
        threads = max(1, (os.cpu_count() or 1) // self.max_parallel)
        os.environ["CMSCALE_NUM_THREADS"] = str(threads)
        executor = self._executor()
        job_callable = _job_callable()
        by_stage = sorted({run.stage for run in runs})
        for stage in by_stage:
            queue = [run for run in runs if run.stage == stage]
            active: dict[str, tuple[PlannedRun, Any]] = {}
            while queue or active:
                while queue and len(active) < self.max_parallel:
                    run = queue.pop(0)
                    failed_deps = [dep for dep in run.depends_on if dep not in done]
                    if failed_deps:
                        report.skipped[run.run_id] = f"teacher {failed_deps[0]} did not finish"
                        continue
                    job = executor.submit(job_callable, run.config.model_dump(mode="json"), str(run.run_dir(self.root)))
                    _record_job(run, self.root, "debug" if self.debug else "local", str(job.job_id), None, None)
                    report.submitted.append(run.run_id)
                    if self.debug:
                        job.result()
                    active[run.run_id] = (run, job)
                for run_id, (run, job) in list(active.items()):
                    if job.done():
                        del active[run_id]
                        state = _local_outcome(run.run_dir(self.root), job)
                        if state == "done":
                            done.add(run_id)
                        if self.on_finish:
                            self.on_finish(run, state)
                if active:
                    time.sleep(0.2)


def _local_outcome(run_dir: Path, job: Any) -> str:
    done_path = Path(run_dir) / "done.json"
    if done_path.is_file():
        try:
            return read_json(done_path).get("status", "failed")
        except ValueError:
            return "failed"
    try:
        job.result()
    except Exception:  # noqa: BLE001 - the job's own failure is recorded by status, not raised here
        return "failed"
    return "failed"
