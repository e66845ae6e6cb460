"""Packed runs (``runs_per_job``) without a scheduler: one process trains several runs, each in its
own folder; done runs are skipped, a failing run does not take its pack down, and the local
launcher packs (one process, one pid, per pack)."""

from __future__ import annotations

import json

import pytest
from conftest import sweep

from cmscale.cluster.jobs import PackJob
from cmscale.config import RunConfig
from cmscale.rundir import read_job, read_json, read_metrics
from cmscale.train import train

NO_EVAL = {"at_fractions": []}


def tiny(seed: int, method: str = "edm", **fields) -> RunConfig:
    return RunConfig(method=method, preset="xxs", batch_size=8, budget_iters=3, log_every=1, eval=NO_EVAL,
                     seed=seed, **fields)


def test_pack_trains_each_run_in_its_folder_skips_done_ones_and_survives_a_failing_run(tmp_path):
    first, broken, last = tiny(0), tiny(1, method="ect", teacher_ckpt=str(tmp_path / "missing.pt")), tiny(2)
    train(first, tmp_path / "first")  # done before the pack starts: the pack must not train it again
    done_before = read_json(tmp_path / "first" / "done.json")
    metrics_before = (tmp_path / "first" / "metrics.jsonl").read_bytes()

    runs = [(config.model_dump(mode="json"), str(tmp_path / name), None)
            for config, name in ((first, "first"), (broken, "broken"), (last, "last"))]
    results = PackJob()(runs)

    assert [result["status"] for result in results] == ["done", "failed", "done"]
    assert read_json(tmp_path / "first" / "done.json") == done_before
    assert (tmp_path / "first" / "metrics.jsonl").read_bytes() == metrics_before
    failed = read_json(tmp_path / "broken" / "done.json")
    assert failed["status"] == "failed" and "missing.pt" in failed["reason"]
    assert read_json(tmp_path / "broken" / "status.json")["state"] == "failed"
    last_dir = tmp_path / "last"
    assert [row["step"] for row in read_metrics(last_dir / "metrics.jsonl", kind="train")] == [1, 2, 3]
    assert {"config.json", "status.json", "heartbeat", "done.json"} <= {p.name for p in last_dir.iterdir()}
    assert (last_dir / "ckpt" / "latest.pt").is_file() and (last_dir / "ckpt" / "final.pt").is_file()


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


REPORT_SPEC = packed_edm_spec("reported", runs=2, budget_iters=150, max_parallel=1, log_every=50)


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
