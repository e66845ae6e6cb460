"""Sweeps on the real localhost SLURM cluster (slurm/local/start.sh): arrays with afterok teachers,
idempotent launch, preemption both ways, lost-run detection and relaunch, cancel.

Two sweeps are shared across tests (module fixtures), because each costs cluster minutes:
``tiny``, the example spec (2 teachers, 8 students), launched and followed with ``--wait``; and
``preempt``, three EDM runs that the fixture interrupts after their first checkpoint: run 0 with
``scancel --signal=USR2`` (submitit checkpoints and requeues), run 1 with ``scontrol requeue``
(SIGTERM; submitit takes no checkpoint), run 2 with a plain ``scancel`` (the job is gone).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import EXAMPLE, RUN_FILES, submitted_count, sweep
from slurm_watch import StatusWatcher, assert_steps_exactly_once, sacct_states, state_of, wait_until

from cmscale.rundir import read_job, read_json, read_metrics
from cmscale.sweep.plan import read_sweep_file
from cmscale.sweep.status import sweep_states

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PREEMPT_ITERS = 80
PREEMPT_HEARTBEAT_S = 2.0
PREEMPT_SPEC = f"""
name = "preempt"
dataset = "digits"
resolution = 16

[defaults]
batch_size = 32
ckpt_every = 10
log_every = 1
heartbeat_s = {PREEMPT_HEARTBEAT_S}

[defaults.eval]
at_fractions = []

[executor]
name = "slurm"
profile = "local"
""" + "".join(
    f'\n[[runs]]\nmethod = "edm"\npreset = "xxs"\nbudget_iters = {PREEMPT_ITERS}\nseed = {seed}\n' for seed in range(3)
)


def live_job_ids() -> set[str]:
    output = subprocess.run(
        ["squeue", "-r", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return set(output.split())


# ----------------------------------------------------------------------------------------------
# The example sweep: teachers, then students with afterok, followed with --wait


@pytest.fixture(scope="module")
def tiny(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_tiny")
    spec = shutil.copy(EXAMPLE, root / "sweep_digits_tiny.toml")
    started = time.time()
    first = sweep("launch", spec, "--root", root, "--executor", "slurm", "--profile", "local")
    # Launching again while every run is queued or running submits nothing, then follows them.
    again = sweep(
        "launch", spec, "--root", root, "--executor", "slurm", "--profile", "local", "--wait", "--wait-timeout", "480"
    )
    plan = read_sweep_file(root, "digits_tiny")
    return SimpleNamespace(
        root=root,
        spec=spec,
        first=first,
        again=again,
        plan=plan,
        base=root / "digits_tiny",
        wall_s=time.time() - started,
    )


def test_tiny_sweep_ends_with_every_run_done(tiny):
    assert submitted_count(tiny.first) == 10
    states = sweep_states(tiny.root, "digits_tiny")
    assert {state.run_id: state.state for state in states} == {run["run_id"]: "done" for run in tiny.plan["runs"]}
    for run in tiny.plan["runs"]:
        run_dir = tiny.base / run["run_id"]
        assert_steps_exactly_once(run_dir)
        evals = read_metrics(run_dir / "metrics.jsonl", kind="eval")
        final = read_json(run_dir / "config.json")["budget_iters_resolved"]
        sampler_steps = [18] if run["config"]["method"] == "edm" else [1, 2]
        assert sorted(row["sampler_steps"] for row in evals) == sampler_steps
        assert all(row["step"] == final and row["fid"] > 0 for row in evals)
        present = {str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()}
        assert RUN_FILES <= present, f"{run_dir.name} lacks {sorted(RUN_FILES - present)}"
        assert read_job(run_dir)["executor"] == "slurm"


def test_launch_while_queued_submits_nothing_and_wait_follows_to_the_end(tiny):
    assert submitted_count(tiny.again) == 0
    assert "runs did not finish" not in tiny.again
    # --wait ingested the results as runs ended: the store already holds them without a new ingest.
    from cmscale.results import query

    done = query(
        "SELECT count(*) AS n FROM runs WHERE sweep = 'digits_tiny' AND status = 'done'",
        root=tiny.root,
        ingest_first=False,
    )
    assert done["n"][0] == 10


def test_status_without_sacct_reads_the_same_states(tiny, tmp_path, monkeypatch):
    """sacct is used but never required: with only squeue on PATH the states are the same."""
    with_sacct = [(state.run_id, state.state) for state in sweep_states(tiny.root, "digits_tiny")]
    (tmp_path / "squeue").symlink_to(shutil.which("squeue"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("sacct") is None
    assert [(state.run_id, state.state) for state in sweep_states(tiny.root, "digits_tiny")] == with_sacct


def test_teachers_finished_before_their_students_started(tiny):
    teachers = {run["run_id"] for run in tiny.plan["runs"] if run["stage"] == 0}
    students = [run for run in tiny.plan["runs"] if run["stage"] == 1]
    assert len(teachers) == 2 and len(students) == 8
    for student in students:
        (teacher,) = student["depends_on"]
        assert teacher in teachers
        teacher_done = read_json(tiny.base / teacher / "done.json")
        student_done = read_json(tiny.base / student["run_id"] / "done.json")
        assert teacher_done["finished"] <= student_done["started"]


def test_sacct_shows_every_array_task_completed(tiny):
    jobs = [read_job(tiny.base / run["run_id"]) for run in tiny.plan["runs"]]
    arrays = sorted({job["array_job_id"] for job in jobs})
    assert len(arrays) == 3  # teachers, then the students of each teacher
    expected = sorted(job["job_id"] for job in jobs)

    def all_completed():  # the last job's record reaches slurmdbd a moment after it ends
        states = sacct_states(arrays)
        return sorted(job for job, _ in states) == expected and all(state == "COMPLETED" for _, state in states)

    wait_until(all_completed, 30, what=f"sacct to show {expected} COMPLETED (sacct: {sacct_states(arrays)})")


def test_launching_a_finished_sweep_again_submits_zero_jobs(tiny):
    output = sweep("launch", tiny.spec, "--root", tiny.root, "--executor", "slurm", "--profile", "local")
    assert submitted_count(output) == 0
    status = json.loads(sweep("status", "digits_tiny", "--root", tiny.root, "--json"))
    assert status["counts"] == {"done": 10}


# ----------------------------------------------------------------------------------------------
# Preemption and lost runs


def checkpoint_step(run_dir: Path) -> int:
    import torch

    return int(torch.load(run_dir / "ckpt" / "latest.pt", map_location="cpu", weights_only=True)["step"])


@pytest.fixture(scope="module")
def preempt(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_preempt")
    spec = root / "preempt.toml"
    spec.write_text(PREEMPT_SPEC)
    assert submitted_count(sweep("launch", spec, "--root", root)) == 3
    plan = read_sweep_file(root, "preempt")
    run_ids = [run["run_id"] for run in sorted(plan["runs"], key=lambda run: run["config"]["seed"])]
    dirs = [root / "preempt" / run_id for run_id in run_ids]
    jobs = [read_job(run_dir)["job_id"] for run_dir in dirs]
    watcher = StatusWatcher(dirs)
    watcher.start()

    def first_checkpoint(run_dir: Path):
        return (run_dir / "ckpt" / "latest.pt").is_file()

    # (a) and (b): signal runs 0 and 1 once each has written its first periodic checkpoint.
    wait_until(
        lambda: first_checkpoint(dirs[0]) and first_checkpoint(dirs[1]), 240, what="first checkpoints of runs 0 and 1"
    )
    ckpt_before = [checkpoint_step(dirs[0]), checkpoint_step(dirs[1])]
    subprocess.run(["scancel", "--signal=USR2", jobs[0]], check=True, timeout=30)
    subprocess.run(["scontrol", "requeue", jobs[1]], check=True, timeout=30)

    # Run 2 starts in a freed slot; after its first checkpoint its job is cancelled outright.
    wait_until(lambda: first_checkpoint(dirs[2]), 240, what="first checkpoint of run 2")
    ckpt_before.append(checkpoint_step(dirs[2]))
    subprocess.run(["scancel", jobs[2]], check=True, timeout=30)
    cancelled_at = time.time()
    wait_until(
        lambda: state_of(root, "preempt", run_ids[2]) in ("lost", "failed"), 60, poll_s=0.1, what="run 2 to show lost"
    )
    lost_after_s = time.time() - cancelled_at
    status_output = json.loads(sweep("status", "preempt", "--root", root, "--json"))
    return SimpleNamespace(
        root=root,
        spec=spec,
        run_ids=run_ids,
        dirs=dirs,
        jobs=jobs,
        watcher=watcher,
        ckpt_before=ckpt_before,
        lost_after_s=lost_after_s,
        status=status_output,
    )


def wait_done(root: Path, run_id: str, timeout_s: float = 240) -> None:
    wait_until(
        lambda: state_of(root, "preempt", run_id) in ("done", "failed", "lost"),
        timeout_s,
        poll_s=1,
        what=f"{run_id} to end",
    )
    assert state_of(root, "preempt", run_id) == "done", read_json(root / "preempt" / run_id / "status.json")


def test_usr2_preemption_checkpoints_requeues_and_resumes(preempt):
    run_dir, job = preempt.dirs[0], preempt.jobs[0]
    wait_done(preempt.root, preempt.run_ids[0])
    states = [s.get("state") for s in preempt.watcher.seen[run_dir.name]]
    assert "requeued" in states  # written by TrainJob.checkpoint, which submitit called on USR2
    resumed = preempt.watcher.resumed_from(run_dir.name)
    assert resumed and resumed[0] >= preempt.ckpt_before[0]
    assert "REQUEUED" in [state for _, state in sacct_states([job], duplicates=True)]
    assert_steps_exactly_once(run_dir)


def test_scontrol_requeue_resumes_from_the_newest_checkpoint_on_disk(preempt):
    run_dir, job = preempt.dirs[1], preempt.jobs[1]
    wait_done(preempt.root, preempt.run_ids[1])
    states = [s.get("state") for s in preempt.watcher.seen[run_dir.name]]
    assert "requeued" not in states  # SIGTERM: submitit takes no checkpoint; the trainer's own save is on disk
    resumed = preempt.watcher.resumed_from(run_dir.name)
    assert resumed and resumed[0] >= preempt.ckpt_before[1]
    assert "REQUEUED" in [state for _, state in sacct_states([job], duplicates=True)]
    assert_steps_exactly_once(run_dir)


def test_cancelled_run_shows_lost_within_two_heartbeats_and_relaunch_completes_it(preempt):
    run_id = preempt.run_ids[2]
    assert preempt.lost_after_s <= 2 * PREEMPT_HEARTBEAT_S
    listed = {run["run_id"]: run for run in preempt.status["runs"]}
    assert listed[run_id]["state"] in ("lost", "failed") and listed[run_id]["reason"]
    # Relaunch waits until the cancelled job's processes are gone (no two writers in one run).
    wait_until(
        lambda: not any(state.ending for state in sweep_states(preempt.root, "preempt")), 60, what="the job to end"
    )
    # Runs 0 and 1 may still be queued or running; relaunch must submit run 2 only.
    output = sweep("relaunch", "preempt", "--root", preempt.root, "--failed")
    assert submitted_count(output) == 1
    assert read_job(preempt.dirs[2])["attempt"] == 2
    wait_done(preempt.root, run_id)
    resumed = preempt.watcher.resumed_from(run_id)
    assert resumed and resumed[-1] >= preempt.ckpt_before[2]
    assert_steps_exactly_once(preempt.dirs[2])


# ----------------------------------------------------------------------------------------------
# Cancel


def test_cancel_leaves_no_job_of_the_sweep_in_squeue(slurm_cluster, tmp_path):
    spec = shutil.copy(EXAMPLE, tmp_path / "sweep_digits_tiny.toml")
    assert submitted_count(sweep("launch", spec, "--root", tmp_path, "--executor", "slurm", "--profile", "local")) == 10
    plan = read_sweep_file(tmp_path, "digits_tiny")
    jobs = {read_job(tmp_path / "digits_tiny" / run["run_id"])["job_id"] for run in plan["runs"]}
    teachers = [run["run_id"] for run in plan["runs"] if run["stage"] == 0]
    # Cancel while teachers run and students wait on them (the pending arrays must go too).
    wait_until(lambda: state_of(tmp_path, "digits_tiny", teachers[0]) == "running", 120, what="a teacher to run")
    assert jobs <= live_job_ids()
    sweep("cancel", "digits_tiny", "--root", tmp_path)
    wait_until(lambda: not (jobs & live_job_ids()), 30, what=f"jobs {sorted(jobs & live_job_ids())} to leave squeue")
    counts = json.loads(sweep("status", "digits_tiny", "--root", tmp_path, "--json"))["counts"]
    assert not {"queued", "running"} & set(counts)
