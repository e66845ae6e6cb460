"""The local executor (cmscale.cluster.launchers, sweep.status, sweep.launch): run states come from
the run's process and its status.json, `sweep cancel` signals only the process it launched (pid and
start time), and the launcher's training processes end with it. Packed runs (``runs_per_job``): runs
dealt to packs by cost, one process per pack, each run reported when it ends. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from conftest import sweep

from cmscale.rundir import (
    RunState,
    atomic_write_json,
    process_descendants,
    process_start_time,
    read_job,
    read_json,
    write_status,
)
from cmscale.sweep.launch import cancel_sweep
from cmscale.sweep.status import run_state

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"method": "edm", "preset": "xxs", "heartbeat_s": 1.0}


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def local_job(run_dir: Path, pid: int, start: int | None) -> None:
    atomic_write_json(run_dir / "job.json", {"executor": "local", "job_id": str(pid), "attempt": 1,
                                             "pid_start": start})


def test_a_started_local_run_is_running_not_queued(tmp_path):
    process = sleeper()
    try:
        run_dir = tmp_path / "sw" / "r0"
        local_job(run_dir, process.pid, process_start_time(process.pid))
        assert run_state("r0", run_dir, CONFIG, {}).state == RunState.RUNNING  # before status.json
        write_status(run_dir, RunState.RUNNING)
        assert run_state("r0", run_dir, CONFIG, {}).state == RunState.RUNNING
    finally:
        process.kill()
        process.wait()
    write_status(run_dir, RunState.INTERRUPTED, step=167, signal="SIGINT")
    os.utime(run_dir / "status.json", (time.time() - 60, time.time() - 60))
    state = run_state("r0", run_dir, CONFIG, {})
    assert state.state == RunState.LOST and "interrupted by SIGINT at step 167" in state.reason


def test_cancel_signals_only_the_process_the_launcher_started(tmp_path):
    ours, unrelated = sleeper(), sleeper()
    try:
        root = tmp_path
        runs = [{"run_id": f"r{i}", "config": CONFIG} for i in range(2)]
        atomic_write_json(root / "sw" / "sweep.json", {"sweep": "sw", "runs": runs})
        local_job(root / "sw" / "r0", ours.pid, process_start_time(ours.pid))
        # r1's job.json names the pid now held by an unrelated process, which started later than the job.
        local_job(root / "sw" / "r1", unrelated.pid, process_start_time(unrelated.pid) - 1)
        assert run_state("r1", root / "sw" / "r1", CONFIG, {}).state == RunState.LOST
        assert cancel_sweep(root, "sw") == [str(ours.pid)]
        assert ours.wait(timeout=10) == -signal.SIGTERM
        time.sleep(0.2)
        assert unrelated.poll() is None
    finally:
        for process in (ours, unrelated):
            process.kill()
            process.wait()


def test_sigint_to_the_local_launcher_ends_its_training_with_a_checkpoint(tmp_path):
    spec = {"name": "sig", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e15], "methods": {"edm": {}},
            "defaults": {"batch_size": 8, "log_every": 1, "ckpt_every": 100000, "heartbeat_s": 1.0,
                         "eval": {"at_fractions": []}},
            "executor": {"name": "local", "max_parallel": 1}}
    path = tmp_path / "sig.toml"
    path.write_text(tomli_w.dumps(spec))
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CMSCALE_NUM_THREADS": "1"}
    # Ctrl-C reaches a command started from a terminal; a test runner started in the background
    # (bash without job control) hands SIGINT down ignored, so restore the default first.
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from cmscale.cli.main import main; main()")
    launcher = subprocess.Popen([sys.executable, "-c", code, "sweep", "launch", str(path), "--root", str(root)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        status = None
        while time.monotonic() < deadline:
            statuses = list(root.glob("sig/*/status.json"))
            if statuses:
                try:
                    status = read_json(statuses[0])
                except (OSError, ValueError):
                    status = None
                if status and status.get("state") == "running" and (status.get("step") or 0) >= 2:
                    break
            time.sleep(0.5)
        assert status and status.get("state") == "running", launcher.stdout.read() if launcher.poll() else status
        children = process_descendants(launcher.pid)
        assert children
        launcher.send_signal(signal.SIGINT)  # the launcher alone, not its process group
        launcher.wait(timeout=180)
        # Helpers of a child (a multiprocessing resource tracker) leave once their parent is gone,
        # which on a loaded machine can take longer than a fixed half second: give them a bounded while.
        deadline = time.monotonic() + 30
        while [pid for pid in children if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [(pid, _cmdline(pid)) for pid in children if _alive(pid)]
        run_dir = statuses[0].parent
        assert read_json(run_dir / "status.json")["state"] == "interrupted"
        assert (run_dir / "ckpt" / "latest.pt").is_file()
        assert json.loads((run_dir / "job.json").read_text())["pid_start"] is not None
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def packed_edm_spec(name: str, runs: int, budget_iters: int, max_parallel: int, log_every: int) -> str:
    """A sweep of ``runs`` xxs EDM runs (seeds 0..runs-1) packed 2 to a job on the local executor."""
    return f"""
name = "{name}"
dataset = "digits"
resolution = 16

[defaults]
batch_size = 8
log_every = {log_every}

[defaults.eval]
at_fractions = []

[executor]
name = "local"
max_parallel = {max_parallel}
runs_per_job = 2
""" + "".join(f'\n[[runs]]\nmethod = "edm"\npreset = "xxs"\nbudget_iters = {budget_iters}\nseed = {seed}\n'
              for seed in range(runs))


PACKED_SPEC = packed_edm_spec("packed", runs=3, budget_iters=2, max_parallel=2, log_every=1)


REPORT_SPEC = packed_edm_spec("reported", runs=2, budget_iters=150, max_parallel=1, log_every=50)
@pytest.mark.slow
def test_local_executor_packs_runs_into_fewer_processes(tmp_path):
    spec = tmp_path / "packed.toml"
    spec.write_text(PACKED_SPEC)
    sweep("launch", spec, "--root", tmp_path)
    plan = read_json(tmp_path / "packed" / "sweep.json")
    jobs = {run["run_id"]: read_job(tmp_path / "packed" / run["run_id"]) for run in plan["runs"]}
    pids = [job["job_id"] for job in jobs.values()]
    assert len(set(pids)) == 2  # 3 runs, 2 to a job: two processes
    for run_id, job in jobs.items():
        assert run_id in job.get("pack", [run_id])
    status = json.loads(sweep("status", "packed", "--root", tmp_path, "--json"))
    assert sorted(run["run_id"] for run in status["runs"]) == sorted(jobs)  # runs, not packs
    assert status["counts"] == {"done": 3}


def test_spread_deals_runs_to_packs_in_turn_with_sizes_within_one():
    """Every run in exactly one pack, no more than runs_per_job per pack, never fewer packs than slots,
    and each size's runs (listed together by the plan) spread over the packs, not chunked into one."""
    from cmscale.cluster.launchers import _spread

    runs = [f"{size}-{budget}" for size in ("t6", "t8", "t12", "t16") for budget in range(5)]
    packs = _spread(runs, runs_per_job=5, parallel=2)
    assert sorted(run for pack in packs for run in pack) == sorted(runs)
    assert len(packs) == 4 and {len(pack) for pack in packs} == {5}
    assert all(len({run.split("-")[0] for run in pack}) >= 3 for pack in packs)
    assert [len(pack) for pack in _spread(runs[:3], runs_per_job=5, parallel=2)] == [2, 1]
    assert _spread([], 5, 2) == []
    # With a cost, the costliest runs are dealt first, so two packs get equal shares of each budget.
    budgets = {run: 2.0 ** int(run.split("-")[1]) for run in runs}
    halves = _spread(runs, runs_per_job=10, parallel=2, cost=budgets.get)
    assert [sum(budgets[run] for run in pack) for pack in halves] == [sum(budgets.values()) / 2] * 2


def test_spread_with_costs_gives_each_run_to_the_lightest_pack_so_packs_end_together():
    """Costs 7, 5, 4, 3, 1 on two slots: dealing in turn gives 12 and 8, longest-first-to-the-lightest
    gives 10 and 10; a full pack takes no more runs."""
    from cmscale.cluster.launchers import _spread

    cost = {"a": 7.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 1.0}
    packs = _spread(list(cost), runs_per_job=5, parallel=2, cost=cost.get)
    assert sorted(sum(cost[run] for run in pack) for pack in packs) == [10.0, 10.0]
    capped = _spread(list(cost), runs_per_job=3, parallel=2, cost=cost.get)
    assert sorted(len(pack) for pack in capped) == [2, 3] and sum(map(len, capped)) == 5


def test_a_small_size_run_costs_more_wall_time_than_a_large_one_of_the_same_flops():
    """The demo's ECT runs at 2.4e11 FLOPs: t6 takes 935 steps (83 s measured), t16 133 steps (24.5 s)."""
    from types import SimpleNamespace

    from cmscale.cluster.launchers import _wall_cost

    t6 = SimpleNamespace(iterations=935, flops_per_step=2.4e11 / 935)
    t16 = SimpleNamespace(iterations=133, flops_per_step=2.4e11 / 133)
    assert 2.5 < _wall_cost(t6) / _wall_cost(t16) < 4.5  # measured 83 / 24.5 = 3.4


@pytest.mark.slow
def test_local_launcher_reports_each_packed_run_when_it_ends_not_when_its_pack_ends(tmp_path):
    """One pack of two equal runs (trained in list order): the first is handed to on_finish while the
    second is still training, and each run is reported exactly once, as done."""
    from cmscale.sweep.launch import submit_runs
    from cmscale.sweep.plan import plan_sweep
    from cmscale.sweep.spec import load_spec

    (tmp_path / "spec.toml").write_text(REPORT_SPEC)
    spec = load_spec(tmp_path / "spec.toml")
    runs = plan_sweep(spec, tmp_path, source="spec.toml")
    reported = []

    def on_finish(run, state):
        others_done = [(other.run_dir(tmp_path) / "done.json").is_file() for other in runs if other is not run]
        reported.append((run.run_id, state, others_done))

    submit_runs(runs, spec, tmp_path, "local", None, on_finish=on_finish)
    assert sorted(run_id for run_id, _, _ in reported) == sorted(run.run_id for run in runs)
    assert all(state == "done" for _, state, _ in reported)
    first_id, _, others_done_then = reported[0]
    assert first_id == runs[0].run_id and others_done_then == [False]


def test_a_done_json_left_by_an_earlier_attempt_does_not_count_as_this_packs_outcome(tmp_path):
    """A pack reports a run early only from a done.json its own job wrote, not one older than the job."""
    import os
    import time
    from types import SimpleNamespace

    from cmscale.cluster.launchers import _LocalJob

    local = _LocalJob([], SimpleNamespace(job_id="not-a-pid"))  # only the submission time matters here
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    for run_dir in (stale, fresh):
        run_dir.mkdir()
        (run_dir / "done.json").write_text("{}")
    an_hour_ago = time.time() - 3600
    os.utime(stale / "done.json", (an_hour_ago, an_hour_ago))
    assert not local.wrote_done(stale) and local.wrote_done(fresh) and not local.wrote_done(tmp_path / "absent")
