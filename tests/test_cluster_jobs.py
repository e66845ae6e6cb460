"""submitit's job callables (cmscale.cluster.jobs) and the one failure writer (cmscale.train.record_failure):
rank 0 alone writes a failure, by torchrun's RANK or else SLURM's task id; a pack records a run that raised
(with its traceback) and goes on to the next."""

from __future__ import annotations

import pytest

from cmscale.cluster.jobs import PackJob
from cmscale.rundir import read_json
from cmscale.train import record_failure


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
