"""submitit's job callables (cmscale.cluster.jobs) and the one failure writer (cmscale.train.record_failure):
rank 0 alone writes a failure, by torchrun's RANK or else SLURM's task id; a job dying at start-up records
the exception; a pack trains each run in its folder, skips done ones, and records a run that raised (with
its traceback) and goes on to the next."""

from __future__ import annotations

import pytest

from cmscale.cluster.jobs import PackJob, TrainJob
from cmscale.config import RunConfig
from cmscale.rundir import read_json, read_metrics
from cmscale.sweep.status import run_state
from cmscale.train import record_failure, train


@pytest.mark.parametrize("env,writes", [({}, True), ({"SLURM_PROCID": "1"}, False), ({"RANK": "1"}, False),
                                        ({"RANK": "0", "SLURM_PROCID": "1"}, True)])
def test_only_the_writer_process_records_a_failure(tmp_path, monkeypatch, env, writes):
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    done = record_failure(tmp_path / "run", "start-up failed: no data", "start-up")
    assert done["status"] == "failed" and done["reason"] == "start-up failed: no data" and done["phase"] == "start-up"
    assert (tmp_path / "run" / "done.json").exists() == writes
    if writes:
        assert read_json(tmp_path / "run" / "done.json") == done
        assert read_json(tmp_path / "run" / "status.json")["state"] == "failed"


def test_a_pack_records_a_run_that_raised_with_its_traceback_and_trains_the_next(tmp_path, monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    bad = {"method": "edm", "preset": "no-such-preset", "budget_iters": 1}
    results = PackJob()([(bad, str(tmp_path / "a"), None), (bad, str(tmp_path / "b"), None)])
    assert [result["status"] for result in results] == ["failed", "failed"]  # the first did not end the pack
    on_disk = read_json(tmp_path / "a" / "done.json")
    assert on_disk["reason"].startswith("ValidationError") and "unknown preset 'no-such-preset'" in on_disk["reason"]
    assert "Traceback" in on_disk["traceback"] and "phase" not in on_disk


NO_EVAL = {"at_fractions": []}


def tiny(seed: int, method: str = "edm", **fields) -> RunConfig:
    return RunConfig(method=method, preset="xxs", batch_size=8, budget_iters=3, log_every=1, eval=NO_EVAL,
                     seed=seed, **fields)


def test_a_job_dying_at_start_up_records_the_exception_for_sweep_status(tmp_path):
    empty = tmp_path / "cifar"
    empty.mkdir()  # exists when planned, but holds no batches when the job starts
    config = RunConfig(method="edm", preset="xxs", budget_iters=1, dataset="cifar10", data_path=str(empty),
                       resolution=32)
    run_dir = tmp_path / "root" / "s" / "r1"
    with pytest.raises(FileNotFoundError):
        TrainJob()(config.model_dump(mode="json"), str(run_dir))
    done = read_json(run_dir / "done.json")
    assert done["status"] == "failed" and done["phase"] == "start-up"
    assert "DatasetNotFoundError" in done["reason"] and "data_batch_1" in done["reason"]
    state = run_state("r1", run_dir, config.model_dump(mode="json"), {})
    assert state.state == "failed" and "data_batch_1" in state.reason


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
