"""Launchers: submit planned runs through submitit and record each submission in the run's job.json.

One interface for every executor: ``launcher.launch(runs, report, live_job_ids, done)``, where
``live_job_ids`` maps runs already queued or running to their job ids (their dependants wait for
them) and ``done`` holds the ids of finished runs. :func:`make_launcher` picks the class.

- :class:`SlurmLauncher`: stage 0 (teachers) goes as one array; students go as one array per
  teacher group with an ``afterok`` dependency on the teachers' array tasks, so the launcher need
  not stay alive. Arrays are cut at the cluster's MaxArraySize.
- :class:`LocalLauncher`: the same jobs as local processes (or, for ``debug``, in this process),
  stage by stage, ``max_parallel`` at once. It waits for a process to end on a pidfd (no polling)
  where the OS has them.

Packing: with ``runs_per_job = k > 1`` both launchers put up to k runs of one array (one stage and
one set of dependencies) into one job, which trains them one after the other in one process
(:class:`cmscale.cluster.jobs.PackJob`). Every run of a pack records the pack's job id and its run ids in
its own job.json, so status, cancel and relaunch keep working per run.
"""

from __future__ import annotations

import math
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from cmscale.cluster.executors import THREADS_ENV, cores_per_job, make_executor
from cmscale.cluster.profiles import Profile, load_profile
from cmscale.cluster.slurm import cluster_max_array_size
from cmscale.config import ConfigError, RunConfig
from cmscale.rundir import (
    DONE_FILE,
    DONE_STATE_KEY,
    JOB_FILE,
    PACK_KEY,
    SUBMITIT_DIR,
    RunState,
    atomic_write_json,
    pid_alive,
    process_descendants,
    process_start_time,
    read_job,
    read_json,
)

SLURM_DEFAULT_MAX_ARRAY_SIZE = 1001
POLL_FALLBACK_S = 0.2  # only where pidfds are missing (not Linux)
PACK_POLL_S = 2.0  # how often the run folders of running packs are read for per-run progress
# A stopped launcher gives its runs this long to checkpoint and exit (SIGINT) before killing them.
STOP_GRACE_S = float(os.environ.get("CMSCALE_STOP_GRACE_S", "120"))
START_TIME_KEY = "pid_start"  # job.json of a local job: its process's start time (pid + start = identity)


class LaunchableRun(Protocol):
    """What a launcher needs of a run (cmscale.sweep.plan.PlannedRun is one)."""

    run_id: str
    config: RunConfig
    stage: int
    flops_per_step: int
    iterations: int
    depends_on: list[str]

    def run_dir(self, root: Path) -> Path: ...


@dataclass
class LaunchReport:
    submitted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # run_id -> why
    sbatch_calls: int = 0
    arrays: list[dict[str, Any]] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)  # a dry run's sbatch files, one per array


def record_job(run_dir: Path, executor: str, job_id: str, array_job_id: str | None, task: int | None,
               pack: list[str] | None = None) -> None:
    """Write the run's job.json (the attempt count goes up by one per submission). ``pack``: the
    run ids that share the job, in the order it trains them (absent for a job of one run)."""
    previous = read_job(run_dir) or {}
    job = {
        "executor": executor,
        "job_id": job_id,
        "array_job_id": array_job_id,
        "array_task": task,
        "submitted": time.time(),
        "attempt": int(previous.get("attempt", 0)) + 1,
    }
    if pack and len(pack) > 1:
        job[PACK_KEY] = list(pack)
    if executor in ("local", "debug") and job_id.isdigit():
        job[START_TIME_KEY] = process_start_time(int(job_id))  # so a later process with this pid is not it
    atomic_write_json(Path(run_dir) / JOB_FILE, job)


def _job_args(run: LaunchableRun, root: Path) -> tuple[dict[str, Any], str, int]:
    """TrainJob's arguments: the config, the run directory and the plan's iteration count."""
    return run.config.model_dump(mode="json"), str(run.run_dir(root)), run.iterations


def _submit(executor: Any, pack: list[LaunchableRun], root: Path) -> Any:
    """Submit one job: TrainJob for a lone run, PackJob for several."""
    from cmscale.cluster.jobs import PackJob, TrainJob

    if len(pack) == 1:
        return executor.submit(TrainJob(), *_job_args(pack[0], root))
    return executor.submit(PackJob(), [_job_args(run, root) for run in pack])


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _spread(runs: list, runs_per_job: int, parallel: int, cost: Callable[[Any], float] | None = None) -> list[list]:
    """Packs of at most ``runs_per_job`` runs, but never fewer packs than ``parallel`` slots can
    run at once (while runs last): packing must not idle a slot.

    Without ``cost`` runs are dealt to the packs in turn (sizes differing by one at most): a sweep
    lists each size's budgets together, so consecutive chunks would put all of one size in one
    pack. With ``cost`` (a run's expected wall time) the costliest run goes first, each to the
    pack with the least cost so far that has room (longest processing time first), so packs that
    run side by side end together."""
    if not runs:
        return []
    count = max(math.ceil(len(runs) / runs_per_job), min(len(runs), parallel))
    if cost is None:
        return [runs[index::count] for index in range(count)]
    packs: list[list] = [[] for _ in range(count)]
    loads = [0.0] * count
    for run in sorted(runs, key=cost, reverse=True):
        open_packs = [index for index in range(count) if len(packs[index]) < runs_per_job]
        lightest = min(open_packs, key=lambda index: loads[index])
        packs[lightest].append(run)
        loads[lightest] += cost(run)
    return packs


# A run's wall time, to balance packs: a fixed start (model, teacher and data loading, evals), a
# fixed cost per step (optimiser, EMA, kernel launches) and its FLOPs. Fitted on the demo's 32
# runs on the 2-core CPU (5.4 s + 71 ms per step + 20 GFLOP/s) and written in FLOPs, since only
# the ratios matter. A FLOP budget alone made a small size's run look as cheap as a large one's,
# though it takes 7x the steps: the demo's packs then ended 111 s apart.
RUN_START_FLOPS = 1.1e11
STEP_OVERHEAD_FLOPS = 1.5e9


def _wall_cost(run: LaunchableRun) -> float:
    """A run's expected wall time in FLOP units (see ``STEP_OVERHEAD_FLOPS``)."""
    return RUN_START_FLOPS + run.iterations * (STEP_OVERHEAD_FLOPS + run.flops_per_step)


class Launcher(Protocol):
    uses_profile: ClassVar[bool]

    def launch(self, runs: list[LaunchableRun], report: LaunchReport, live_job_ids: Mapping[str, str],
               done: set[str]) -> None: ...


def sbatch_script(executor: Any, tasks: int) -> str:
    """The sbatch file submitit would submit for ``tasks`` jobs in one batch (an array when more
    than one), rendered the way submitit renders it, without submitting anything."""
    from submitit.slurm.slurm import SlurmExecutor

    slurm = executor._executor  # the AutoExecutor's SLURM executor
    rendered = SlurmExecutor(slurm.folder, slurm.max_num_timeout)
    rendered.update_parameters(**slurm.parameters)
    if tasks > 1:
        rendered.parameters["map_count"] = tasks
    return rendered._make_submission_file_text(rendered._submitit_command_str, "dry-run")


class SlurmLauncher:
    """Submits arrays with submitit's SLURM executor. ``dry_run`` writes the sbatch files that
    would be submitted into ``script_dir`` instead (job ids in them are placeholders)."""

    uses_profile: ClassVar[bool] = True

    def __init__(self, root: Path, sweep: str, profile: Profile, dry_run: bool = False,
                 on_progress: Callable[[int, int], None] | None = None, runs_per_job: int = 1,
                 script_dir: Path | None = None):
        self.root = Path(root)
        self.script_dir = Path(script_dir) if script_dir else self.root / sweep / "_dry_run"
        self.runs_per_job = runs_per_job
        self.sweep = sweep
        self.profile = profile
        self.dry_run = dry_run
        self.on_progress = on_progress  # (runs submitted so far, runs to submit)
        self._total = 0
        # Array task indices run 0..MaxArraySize-1, so an array holds at most MaxArraySize tasks.
        # A dry run asks the cluster too when one answers; otherwise SLURM's default (1001) holds.
        limits = [limit for limit in (profile.max_array_size, cluster_max_array_size()) if limit]
        self.max_array = min(limits) if limits else SLURM_DEFAULT_MAX_ARRAY_SIZE

    def submit_array(self, runs: list[LaunchableRun], dependency: str | None, report: LaunchReport) -> list[str]:
        """Submit ``runs``, ``runs_per_job`` to a task, as arrays of at most MaxArraySize tasks;
        returns one job id per run (the id of its pack's task)."""
        job_ids: list[str] = []
        for chunk in _chunks(list(_chunks(runs, self.runs_per_job)), self.max_array):
            report.sbatch_calls += 1
            executor = make_executor("slurm", Path(self.root) / self.sweep / SUBMITIT_DIR / "%j",
                                     name=f"cmscale-{self.sweep}", profile=self.profile)
            extra = dict(self.profile.sbatch_extra)
            if dependency:
                extra |= {"dependency": dependency, "kill-on-invalid-dep": "yes"}
            executor.update_parameters(slurm_additional_parameters=extra)
            if self.dry_run:
                fake = f"dryrun{report.sbatch_calls}"
                job_ids += [f"{fake}_{i}" for i, pack in enumerate(chunk) for _ in pack]
                report.arrays.append({"array_job_id": fake, "tasks": len(chunk), "dependency": dependency,
                                      "runs": [run.run_id for pack in chunk for run in pack]})
                self.script_dir.mkdir(parents=True, exist_ok=True)
                script = self.script_dir / f"{fake}.sbatch"
                header = "".join(f"# task {i}: {', '.join(run.run_id for run in pack)}\n"
                                 for i, pack in enumerate(chunk))
                text = sbatch_script(executor, len(chunk))
                first, _, rest = text.partition("\n")  # the shebang stays first
                script.write_text(f"{first}\n# cmscale dry run: {fake} stands for the array's job id\n{header}{rest}")
                report.scripts.append(str(script))
                continue
            with executor.batch():
                jobs = [_submit(executor, pack, self.root) for pack in chunk]
            array_job_id = jobs[0].job_id.split("_")[0]
            report.arrays.append({"array_job_id": array_job_id, "tasks": len(chunk), "dependency": dependency})
            for task, (pack, job) in enumerate(zip(chunk, jobs)):
                for run in pack:
                    record_job(run.run_dir(self.root), "slurm", job.job_id, array_job_id, task,
                               pack=[member.run_id for member in pack])
                    job_ids.append(job.job_id)
            if self.on_progress:
                self.on_progress(len(report.submitted) + len(job_ids), self._total)
        report.submitted += [run.run_id for run in runs]
        return job_ids

    def launch(self, runs: list[LaunchableRun], report: LaunchReport, live_job_ids: Mapping[str, str],
               done: set[str]) -> None:
        """Teachers first as arrays; students grouped by their live teachers, each group one array.

        A student whose teachers are all ``done`` goes without a dependency."""
        self._total = len(runs)
        teacher_job: dict[str, str] = dict(live_job_ids)
        teachers = [run for run in runs if run.stage == 0]
        if teachers:
            for run, job_id in zip(teachers, self.submit_array(teachers, None, report)):
                teacher_job[run.run_id] = job_id
        groups: dict[tuple[str, ...], list[LaunchableRun]] = {}
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
    ``debug`` runs each job in this process (submitit's DebugExecutor), one at a time; ``dry_run``
    only lists the runs.
    """

    uses_profile: ClassVar[bool] = False

    def __init__(self, root: Path, sweep: str, max_parallel: int, timeout_min: int, debug: bool = False,
                 dry_run: bool = False, on_finish: Callable[[LaunchableRun, str], None] | None = None,
                 runs_per_job: int = 1):
        self.root = Path(root)
        self.runs_per_job = runs_per_job
        self.sweep = sweep
        self.max_parallel = 1 if debug else max_parallel
        self.timeout_min = timeout_min
        self.kind = "debug" if debug else "local"
        self.dry_run = dry_run
        self.on_finish = on_finish

    def launch(self, runs: list[LaunchableRun], report: LaunchReport, live_job_ids: Mapping[str, str],
               done: set[str]) -> None:
        """Run ``runs`` to their end; a student whose teacher did not finish is skipped.

        ``live_job_ids`` are not waited for: runs of other launchers are not this one's children."""
        if self.dry_run:
            report.submitted += [run.run_id for run in runs]
            return
        os.environ[THREADS_ENV] = str(cores_per_job(self.max_parallel))
        executor = make_executor(self.kind, self.root / self.sweep / SUBMITIT_DIR / "%j", name=f"cmscale-{self.sweep}",
                                 timeout_min=self.timeout_min)
        active: list[_LocalJob] = []
        with _interrupt_on_sigterm():
            try:
                self._run_stages(runs, report, done, executor, active)
            except BaseException:
                # Ctrl-C or SIGTERM: the runs end with the launcher (checkpointed), never orphaned.
                if self.kind == "local":  # debug jobs run in this process and end with it
                    stop_local_jobs(active)
                raise

    def _run_stages(self, runs: list[LaunchableRun], report: LaunchReport, done: set[str], executor: Any,
                    active: list[_LocalJob]) -> None:
        for stage in sorted({run.stage for run in runs}):
            ready = []
            for run in runs:  # a stage starts once the one before has ended, so its teachers are known
                failed_deps = [dep for dep in run.depends_on if dep not in done]
                if run.stage != stage:
                    continue
                if failed_deps:
                    report.skipped[run.run_id] = f"teacher {failed_deps[0]} did not finish"
                else:
                    ready.append(run)
            queue = _spread(ready, self.runs_per_job, self.max_parallel, cost=_wall_cost)
            while queue or active:
                while queue and len(active) < self.max_parallel:
                    pack = queue.pop(0)
                    job = _submit(executor, pack, self.root)
                    for run in pack:
                        record_job(run.run_dir(self.root), self.kind, str(job.job_id), None, None,
                                   pack=[member.run_id for member in pack])
                        report.submitted.append(run.run_id)
                    if self.kind == "debug":
                        job.result()
                    active.append(_LocalJob(pack, job))
                if active and not any(local.job.done() for local in active):
                    # A pack's runs end one by one: look at their folders every few seconds
                    # so progress is reported per run, not only when the whole pack ends.
                    packed = any(len(local.runs) > 1 for local in active)
                    _wait_for_any(active, timeout_s=PACK_POLL_S if packed else None)
                ended = [local for local in active if local.job.done()]
                for local in active:
                    self._report(local, ended=local in ended, done=done)
                for local in ended:
                    active.remove(local)
                    local.close()

    def _report(self, local: _LocalJob, ended: bool, done: set[str]) -> None:
        """Hand each run of ``local`` that has ended (its done.json written, or its job over) to on_finish, once."""
        for run in local.runs:
            if run.run_id in local.reported:
                continue
            if not ended and not local.wrote_done(run.run_dir(self.root)):
                continue
            local.reported.add(run.run_id)
            state = _local_outcome(run.run_dir(self.root), local.job)
            if state == RunState.DONE:
                done.add(run.run_id)
            if self.on_finish:
                self.on_finish(run, state)


class _LocalJob:
    """A submitted local job (its runs) and, where the OS has them, a pidfd that turns readable when it ends."""

    def __init__(self, runs: list[LaunchableRun], job: Any):
        self.runs, self.job = runs, job
        self.reported: set[str] = set()  # runs whose outcome went to on_finish
        self.submitted = time.time()
        self.pidfd: int | None = None
        try:  # a child not yet reaped keeps its pid, so the pidfd cannot name another process
            self.pidfd = os.pidfd_open(int(job.job_id))
        except (AttributeError, ValueError, OSError):
            pass

    def wrote_done(self, run_dir: Path) -> bool:
        """Whether this job wrote the run's done.json (one left by an earlier attempt is older than the job)."""
        try:
            return (run_dir / DONE_FILE).stat().st_mtime >= self.submitted - 1
        except OSError:
            return False

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class _interrupt_on_sigterm:
    """While the launcher runs its jobs, SIGTERM stops it as Ctrl-C does (main thread only)."""

    def __enter__(self) -> None:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def stop_local_jobs(jobs: list[_LocalJob], grace_s: float = STOP_GRACE_S) -> None:
    """End the launcher's local jobs: SIGINT to each job's training processes (they checkpoint,
    write status "interrupted" and exit), then, after ``grace_s``, SIGKILL to whatever is left."""
    pids = []
    for local in jobs:
        controller = int(local.job.job_id) if str(local.job.job_id).isdigit() else None
        if controller is None:
            continue
        # submitit's controller forwards no SIGINT (and kills its task 1 s after one): signal the task itself.
        targets = process_descendants(controller) or [controller]
        pids += [controller, *targets]
        for pid in targets:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for local in jobs:
        local.close()


def _wait_for_any(jobs: list[_LocalJob], timeout_s: float | None = None) -> None:
    """Block until one of ``jobs`` may have ended, or ``timeout_s`` has passed."""
    fds = [job.pidfd for job in jobs]
    if all(fd is not None for fd in fds):
        select.select(fds, [], [], timeout_s)
    else:
        time.sleep(POLL_FALLBACK_S if timeout_s is None else min(timeout_s, POLL_FALLBACK_S))


def _local_outcome(run_dir: Path, job: Any) -> str:
    done_path = Path(run_dir) / DONE_FILE
    if done_path.is_file():
        try:
            return read_json(done_path).get(DONE_STATE_KEY, RunState.FAILED)
        except ValueError:
            return RunState.FAILED
    try:
        job.result()
    except Exception:  # noqa: BLE001 - the job's own failure is recorded by status, not raised here
        return RunState.FAILED
    return RunState.FAILED


LAUNCHERS: dict[str, type] = {"slurm": SlurmLauncher, "local": LocalLauncher, "debug": LocalLauncher}


def make_launcher(
    kind: str,
    root: Path,
    sweep: str,
    *,
    profile_name: str | None = None,
    profile_where: str = "--profile",
    max_parallel: int = 2,
    timeout_min: int = 60,
    dry_run: bool = False,
    on_finish: Callable[[LaunchableRun, str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    runs_per_job: int = 1,
    script_dir: Path | None = None,
) -> Launcher:
    """The launcher for executor ``kind``. A SLURM launcher loads profile ``profile_name``; a bad
    profile raises ConfigError prefixed with ``profile_where`` (the option or spec field that named it)."""
    if kind == "slurm":
        try:
            profile = load_profile(profile_name or "local")
        except ConfigError as error:
            raise ConfigError(f"{profile_where}: {error}") from None
        return SlurmLauncher(root, sweep, profile, dry_run=dry_run, on_progress=on_progress,
                             runs_per_job=runs_per_job, script_dir=script_dir)
    if kind in LAUNCHERS:
        return LocalLauncher(root, sweep, max_parallel, timeout_min, debug=kind == "debug", dry_run=dry_run,
                             on_finish=on_finish, runs_per_job=runs_per_job)
    raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(LAUNCHERS)}")
