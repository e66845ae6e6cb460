"""Multi-task jobs and packed runs on the localhost SLURM cluster.

- One run as 2 ranks (``tasks_per_node = 2``, gloo on CPU, submitit's distributed environment):
  its losses equal a 1-process run with the whole batch, rank 0 alone writes, and through a USR2
  (``scancel --signal=USR2``) and an ``scontrol requeue`` both ranks stop after the same step,
  the job resumes as 2 ranks from exactly that step.
- A pack of 3 runs in one array task, preempted with USR2 while its second run trains: the done
  run is not trained again, the second resumes from its checkpoint, the third is ``queued`` until
  its turn, and ``sweep status`` lists the 3 runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import submitted_count, sweep
from slurm_watch import StatusWatcher, assert_steps_exactly_once, sacct_states, state_of, wait_until

from cmscale.config import RunConfig
from cmscale.rundir import read_job, read_json, read_metrics
from cmscale.sweep.plan import read_sweep_file

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_RANKS_PROFILE = """
partition = "debug"
tasks_per_node = 2
cpus_per_task = 1
mem_gb = 2
timeout_min = 20
signal_delay_s = 30
max_num_timeout = 30
"""
RANK_ITERS = 40
RUN_FIELDS = {"batch_size": 8, "log_every": 1, "ckpt_every": 1000, "heartbeat_s": 2.0}


def spec_text(name: str, iters: list[int], profile: str, runs_per_job: int = 1) -> str:
    defaults = "".join(f"{key} = {value}\n" for key, value in RUN_FIELDS.items())
    runs = "".join(f'\n[[runs]]\nmethod = "edm"\npreset = "xxs"\nbudget_iters = {n}\nseed = {seed}\n'
                   for seed, n in enumerate(iters))
    return (f'name = "{name}"\ndataset = "digits"\nresolution = 16\n\n[defaults]\n{defaults}\n'
            f'[defaults.eval]\nat_fractions = []\n\n[executor]\nname = "slurm"\nprofile = "{profile}"\n'
            f"runs_per_job = {runs_per_job}\n{runs}")


def train_steps(run_dir: Path) -> int:
    return len(read_metrics(run_dir / "metrics.jsonl", kind="train"))


def stop_lines(log_dir: Path, job_id: str) -> dict[int, list[tuple[int, str]]]:
    """rank -> [(step, signal)] from the "stopped at step" lines each rank printed (one per stop)."""
    stops = {}
    for rank in (0, 1):
        text = (log_dir / f"{job_id}_{rank}_log.err").read_text()
        stops[rank] = [(int(step), sig) for step, sig in re.findall(r"rank \d/2 stopped at step (\d+) on (\w+)", text)]
    return stops


def test_two_rank_run_matches_one_process_and_resumes_as_two_ranks_after_usr2_and_requeue(slurm_cluster, tmp_path):
    (tmp_path / "two_ranks.toml").write_text(TWO_RANKS_PROFILE)
    spec = tmp_path / "ranks.toml"
    spec.write_text(spec_text("ranks", [RANK_ITERS], str(tmp_path / "two_ranks.toml")))
    assert submitted_count(sweep("launch", spec, "--root", tmp_path)) == 1
    (run,) = read_sweep_file(tmp_path, "ranks")["runs"]
    run_dir = tmp_path / "ranks" / run["run_id"]
    job_id = read_job(run_dir)["job_id"]
    watcher = StatusWatcher([run_dir])
    watcher.start()

    wait_until(lambda: train_steps(run_dir) >= 5, 240, what="5 steps of the 2-rank run")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    wait_until(lambda: watcher.resumed_from(run_dir.name), 240, what="the resume after USR2")
    wait_until(lambda: train_steps(run_dir) >= watcher.resumed_from(run_dir.name)[0] + 5, 240, what="5 more steps")
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    wait_until(lambda: state_of(tmp_path, "ranks", run["run_id"]) in ("done", "failed", "lost"), 300, poll_s=1,
               what="the run to end")
    watcher.stop.set()
    assert state_of(tmp_path, "ranks", run["run_id"]) == "done"

    # Both ranks stopped after the same step each time, and the job resumed from exactly that step.
    stops = stop_lines(tmp_path / "ranks" / "_submitit" / job_id, job_id)
    assert [sig for _, sig in stops[0]] == ["SIGUSR2", "SIGTERM"], stops
    assert stops[0] == stops[1], stops
    assert watcher.resumed_from(run_dir.name)[:2] == [step for step, _ in stops[0]]
    assert "REQUEUED" in [state for _, state in sacct_states([job_id], duplicates=True)]
    assert read_json(run_dir / "config.json")["world_size"] == 2
    assert_steps_exactly_once(run_dir)

    # The same losses as one process with the whole batch (rank 0 alone wrote the metrics).
    from cmscale.train import train

    config = RunConfig.model_validate(run["config"])
    train(config, tmp_path / "one_process", iterations=run["iterations"])
    single = [row["loss"] for row in read_metrics(tmp_path / "one_process" / "metrics.jsonl", kind="train")]
    ranks = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl", kind="train")]
    assert len(ranks) == len(single) == RANK_ITERS
    assert ranks == pytest.approx(single, rel=1e-4)


def test_pack_preempted_mid_pack_resumes_its_unfinished_runs_and_skips_finished_ones(slurm_cluster, tmp_path):
    spec = tmp_path / "pack.toml"
    spec.write_text(spec_text("pack", [4, 60, 4], "local", runs_per_job=3))
    assert submitted_count(sweep("launch", spec, "--root", tmp_path)) == 3
    plan = read_sweep_file(tmp_path, "pack")
    run_ids = [r["run_id"] for r in sorted(plan["runs"], key=lambda r: r["config"]["seed"])]
    dirs = [tmp_path / "pack" / run_id for run_id in run_ids]
    jobs = [read_job(run_dir) for run_dir in dirs]
    assert len({job["job_id"] for job in jobs}) == 1 and all(job["pack"] == run_ids for job in jobs)
    job_id = jobs[0]["job_id"]
    watcher = StatusWatcher(dirs)
    watcher.start()

    wait_until(lambda: train_steps(dirs[1]) >= 5, 240, what="5 steps of the pack's second run")
    first_done = read_json(dirs[0] / "done.json")
    status = json.loads(sweep("status", "pack", "--root", tmp_path, "--json"))
    states = {r["run_id"]: r["state"] for r in status["runs"]}
    assert states == {run_ids[0]: "done", run_ids[1]: "running", run_ids[2]: "queued"}
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    wait_until(lambda: all(state_of(tmp_path, "pack", run_id) in ("done", "failed", "lost") for run_id in run_ids),
               300, poll_s=1, what="the pack to end")
    watcher.stop.set()

    assert [state_of(tmp_path, "pack", run_id) for run_id in run_ids] == ["done"] * 3
    assert read_json(dirs[0] / "done.json") == first_done  # not trained again
    assert "requeued" in [s.get("state") for s in watcher.seen[run_ids[1]]]
    assert watcher.resumed_from(run_ids[1])[0] >= 5
    assert "REQUEUED" in [state for _, state in sacct_states([job_id], duplicates=True)]
    for run_dir in dirs:
        assert_steps_exactly_once(run_dir)
