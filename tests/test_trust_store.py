"""The store's integrity (issue 13, items 1, 2 and 14): a run is (sweep, run_id) everywhere, one bad value costs
one row (reported with file, byte offset and field), and a retried Optuna trial keeps its failed attempt.

Run directories are written with the real writers of cmscale.rundir into a real DuckDB file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from cmscale.cli import main
from cmscale.results import SCHEMA_VERSION, connect, ingest
from cmscale.results.schema import MIGRATIONS
from cmscale.rundir import MetricsWriter, atomic_write_json, read_json, write_status
from cmscale.tune.spec import parse_tune_spec
from cmscale.tune.study import claim_trial, create_study, fail_trial, trial_run_id, write_trial_file


def write_run(root: Path, sweep: str, run_id: str, losses: list[float], fid: float) -> Path:
    run_dir = root / sweep / run_id
    atomic_write_json(run_dir / "config.json", {"method": "edm", "preset": "xxs", "sweep": sweep, "run_id": run_id,
                                                "seed": 0, "budget_iters": len(losses), "flops_per_step": 1e9})
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:
        for step, loss in enumerate(losses, start=1):
            writer.write({"kind": "train", "step": step, "images_seen": 4 * step, "train_flops": 1e9 * step,
                          "loss": loss, "wall_s": 0.1 * step})
        writer.write({"kind": "eval", "step": len(losses), "train_flops": 1e9 * len(losses), "sampler_steps": 1,
                      "nfe": 1, "fid": fid, "num_samples": 100, "extractor": "digits", "reference": "digits-train"})
    atomic_write_json(run_dir / "done.json", {"status": "done", "reason": None, "final_step": len(losses)})
    write_status(run_dir, "done")
    return run_dir


def rows(root: Path, sql: str) -> list[tuple]:
    with connect(root) as con:
        return con.execute(sql).fetchall()


# -- item 1: run identity is (sweep, run_id) ---------------------------------------------------------------------


def test_two_sweeps_with_the_same_run_id_coexist_and_removing_one_leaves_the_other(tmp_path):
    write_run(tmp_path, "a", "edm-xxs-s0-same", [1.0, 0.9], fid=50.0)
    write_run(tmp_path, "b", "edm-xxs-s0-same", [2.0, 1.9, 1.8], fid=40.0)
    report = ingest(tmp_path)
    assert not report.errors and not report.warnings
    assert rows(tmp_path, "SELECT sweep, run_id, status FROM runs ORDER BY sweep") == [
        ("a", "edm-xxs-s0-same", "done"), ("b", "edm-xxs-s0-same", "done")]
    assert rows(tmp_path, "SELECT sweep, count(*), max(loss) FROM train GROUP BY sweep ORDER BY sweep") == [
        ("a", 2, 1.0), ("b", 3, 2.0)]
    summary = "SELECT sweep, n_train_rows, final_loss, fid_1step FROM run_summary ORDER BY sweep"
    assert rows(tmp_path, summary) == [("a", 2, 0.9, 50.0), ("b", 3, 1.8, 40.0)]
    assert rows(tmp_path, "SELECT sweep, fid FROM latest_eval ORDER BY sweep") == [("a", 50.0), ("b", 40.0)]

    shutil.rmtree(tmp_path / "a")
    ingest(tmp_path)
    assert rows(tmp_path, "SELECT sweep, run_id FROM runs") == [("b", "edm-xxs-s0-same")]
    assert rows(tmp_path, "SELECT sweep, count(*) FROM train GROUP BY sweep") == [("b", 3)]
    assert rows(tmp_path, "SELECT sweep, count(*) FROM evals GROUP BY sweep") == [("b", 1)]
    assert rows(tmp_path, summary) == [("b", 3, 1.8, 40.0)]


def test_a_schema_1_database_migrates_and_is_rebuilt_from_the_run_folders(tmp_path):
    write_run(tmp_path, "a", "same", [1.0, 0.9], fid=50.0)
    write_run(tmp_path, "b", "same", [2.0, 1.9, 1.8], fid=40.0)
    with duckdb.connect(str(tmp_path / "cmscale.duckdb")) as con:  # the database as schema 1 left it: merged
        version, description, apply = MIGRATIONS[0]
        assert version == 1
        con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description VARCHAR, "
                    "applied_at TIMESTAMP)")
        apply(con)
        con.execute("INSERT INTO schema_version VALUES (1, ?, now())", [description])
        con.execute("INSERT INTO runs (run_id, sweep, status) VALUES ('same', 'a', 'done')")
        con.execute("INSERT INTO train (run_id, step, loss) VALUES ('same', 1, 2.0), ('same', 2, 1.9), "
                    "('same', 3, 1.8)")
        con.execute("INSERT INTO ingest_files (path, run_id, size, consumed) "
                    "VALUES ('b/same/metrics.jsonl', 'same', 1, 1)")
    assert SCHEMA_VERSION >= 2
    ingest(tmp_path)
    assert rows(tmp_path, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    assert rows(tmp_path, "SELECT sweep, run_id FROM runs ORDER BY sweep") == [("a", "same"), ("b", "same")]
    assert rows(tmp_path, "SELECT sweep, count(*) FROM train GROUP BY sweep ORDER BY sweep") == [("a", 2), ("b", 3)]


# -- item 2: one badly typed value costs one row ---------------------------------------------------------------


def test_a_badly_typed_value_skips_only_its_row_and_is_reported_with_offset_and_field(tmp_path):
    run_dir = tmp_path / "s" / "r"
    # 5,000 rows: the fallback parses blocks of 2,048 lines, and the bad row sits in the second block.
    lines = [{"kind": "train", "step": step, "loss": 1.0 / step, "wall_s": 0.0} for step in range(1, 5001)]
    lines[2999]["loss"] = "high"
    text = "".join(json.dumps(line) + "\n" for line in lines)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(text)
    offset = len("".join(json.dumps(line) + "\n" for line in lines[:2999]).encode())

    result = CliRunner().invoke(main, ["results", "ingest", "--root", str(tmp_path), "--strict", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["train_rows"] == 4999
    [problem] = report["errors"]
    assert problem["path"] == str(run_dir / "metrics.jsonl")
    for part in (f"byte {offset}", "field 'loss'", "'high'"):
        assert part in problem["message"]
    assert rows(tmp_path, "SELECT count(*), count(*) FILTER (WHERE step = 3000) FROM train") == [(4999, 0)]

    with MetricsWriter(run_dir / "metrics.jsonl") as writer:  # the file goes on; the bad row is not re-read
        writer.write({"kind": "train", "step": 5001, "loss": 0.5, "wall_s": 0.0})
    again = CliRunner().invoke(main, ["results", "ingest", "--root", str(tmp_path), "--strict", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["train_rows"] == 1
    assert rows(tmp_path, "SELECT count(*) FROM train") == [(5000,)]


@pytest.mark.parametrize("line", ['{"kind": "train", "step": "two", "loss": 1.0}',
                                  '{"kind": "train", "step": 2, "loss": [1]}',
                                  '{"kind": "eval", "step": 2, "sampler_steps": 1, "fid": {"x": 1}}',
                                  "not json at all"])
def test_each_kind_of_bad_row_is_an_error_for_strict(tmp_path, line):
    run_dir = tmp_path / "s" / "r"
    run_dir.mkdir(parents=True)
    good = json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n"
    (run_dir / "metrics.jsonl").write_text(good + line + "\n" + good.replace('"step": 1', '"step": 3'))
    report = ingest(tmp_path)
    assert report.train_rows == 2
    [problem] = report.errors
    assert f"byte {len(good)}" in problem.message


# -- item 14: a retried Optuna trial keeps every attempt ------------------------------------------------------------


def test_a_retried_trial_keeps_its_failed_attempt_in_trial_json_and_in_the_trials_table(tmp_path):
    root = tmp_path / "root"
    spec = parse_tune_spec({"name": "retry", "n_trials": 1,
                            "base": {"method": "edm", "preset": "xxs", "budget_iters": 8},
                            "space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                            "objective": {"metrics": ["fid"]}})
    search = create_study(spec, root)
    first = claim_trial(search)
    lr = first.suggest_float("lr", 1e-4, 1e-2, log=True)
    run_id = trial_run_id(search.frozen(first.number))
    run_dir = root / "retry" / run_id
    write_trial_file(run_dir, "retry", first.number, "RUNNING", {"lr": lr}, None, run_id)  # as run_trial does
    assert fail_trial(search, search.frozen(first.number), "worker died", retry=True)
    retry = claim_trial(search)
    assert retry.suggest_float("lr", 1e-4, 1e-2, log=True) == lr
    write_trial_file(run_dir, "retry", retry.number, "COMPLETE", {"lr": lr}, [12.5], run_id)

    record = read_json(run_dir / "trial.json")
    assert (record["trial_number"], record["state"], record["attempt"]) == (1, "COMPLETE", 2)
    [earlier] = record["earlier_attempts"]
    assert (earlier["trial_number"], earlier["state"], earlier["attempt"]) == (0, "FAIL", 1)
    assert earlier["reason"] == "worker died"
    ingest(root)
    assert rows(root, "SELECT trial_number, state, attempt, reason, run_id FROM trials ORDER BY trial_number") == [
        (0, "FAIL", 1, "worker died", run_id), (1, "COMPLETE", 2, None, run_id)]
