"""The DuckDB results store: exact counts under concurrent writers and ingests, torn lines, resume
rewrites, no-op re-ingest, read-only queries, malformed files. Run directories are written with the
real writers from cmscale.rundir; every ingest goes to a real DuckDB file."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner

from cmscale.cli.results import results_group
from cmscale.results import (
    SCHEMA_VERSION,
    ReadOnlyQueryError,
    StoreError,
    connect,
    ingest,
    migrate,
    query,
)
from cmscale.rundir import MetricsWriter, atomic_write_json, truncate_metrics_after, write_status

SWEEP = "sw"


def train_row(rank: int, step: int, wall_s: float = 0.0) -> dict:
    # The loss encodes (rank, step), so the tests can check every stored value in SQL.
    return {
        "kind": "train",
        "step": step,
        "images_seen": 64 * step,
        "train_flops": 1e9 * step,
        "loss": rank + step * 1e-4,
        "wall_s": wall_s,
    }


def eval_row(step: int, sampler_steps: int, fid: float) -> dict:
    return {
        "kind": "eval",
        "step": step,
        "train_flops": 1e9 * step,
        "images_seen": 64 * step,
        "sampler_steps": sampler_steps,
        "nfe": sampler_steps,
        "fid": fid,
        "num_samples": 500,
        "extractor": "digits-classifier",
        "reference": "digits-train",
        "sampling_flops_per_image": 2e6 * sampler_steps,
        "wall_s": 1.0,
    }


def config_of(run_id: str, rank: int) -> dict:
    return {
        "method": "ect",
        "preset": "xs",
        "dataset": "digits",
        "resolution": 8,
        "batch_size": 64,
        "seed": rank,
        "budget_flops": None,
        "budget_iters": 100,
        "run_id": run_id,
        "params": 1000 + rank,
        "flops_per_step": 1e9,
        "flops_per_image_forward": 2e6,
        "budget_iters_resolved": 100,
        "img_channels": 1,
        "world_size": 1,
        "git_commit": "abc123",
        "sweep": SWEEP,
    }


def make_run(root: Path, rank: int, n_train: int, done: bool = True, evals: tuple = ()) -> Path:
    run_id = f"r{rank:02d}"
    run_dir = root / SWEEP / run_id
    atomic_write_json(run_dir / "config.json", config_of(run_id, rank))
    write_status(run_dir, "running")
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:
        for step in range(n_train):
            writer.write(train_row(rank, step))
        for row in evals:
            writer.write(row)
    if done:
        atomic_write_json(run_dir / "done.json", {"status": "done", "reason": None, "final_step": n_train - 1,
                                                  "train_flops": 1e9 * (n_train - 1), "wall_s": 3.0,
                                                  "started": 1.7e9, "finished": 1.7e9 + 3.0})
        write_status(run_dir, "done")
    return run_dir


def scalar(root: Path, sql: str):
    return query(sql, root, ingest_first=False).item()


def table_fingerprint(root: Path) -> dict:
    with connect(root) as con:
        return {
            table: con.execute(f"SELECT count(*), sum(hash(COLUMNS(*))) FROM (SELECT * FROM {table})").fetchall()
            for table in ("sweeps", "runs", "train", "evals", "trials")
        }


# ----------------------------------------------------------------------------- concurrency


def _writer(root: str, rank: int, rows: int, resume_at: int | None, start) -> None:
    """One job: writes ``rows`` train rows; a resumed job rewrites its file back to its checkpoint
    (as the trainer does) and writes the later rows again."""
    start.wait()
    run_dir = Path(root) / SWEEP / f"r{rank:02d}"
    atomic_write_json(run_dir / "config.json", config_of(f"r{rank:02d}", rank))
    path = run_dir / "metrics.jsonl"
    writer = MetricsWriter(path)
    step = 0
    while step < rows:
        writer.write(train_row(rank, step, wall_s=time.time()))
        step += 1
        if step % 20 == 0:  # jobs log over a few seconds, so the ingest loop overlaps them
            time.sleep(0.02)
        if resume_at is not None and step == resume_at:
            writer.close()
            checkpoint = resume_at - 300
            truncate_metrics_after(path, checkpoint)
            writer = MetricsWriter(path)
            step = checkpoint + 1
            resume_at = None
    writer.close()


def test_16_writers_with_ingest_loop_give_exactly_32000_rows(tmp_path):
    ctx = multiprocessing.get_context("fork")  # children only write files; forked before any DuckDB use
    start = ctx.Event()
    writers = [
        ctx.Process(target=_writer, args=(str(tmp_path), rank, 2000, 1200 if rank % 4 == 0 else None, start))
        for rank in range(16)
    ]
    for process in writers:
        process.start()
    ingest(tmp_path)  # creates the database (and loads pyarrow) before the writers start
    start.set()
    ingests_while_writing = 0
    rows_seen_while_writing = 0
    while any(process.is_alive() for process in writers):
        report = ingest(tmp_path)
        assert not report.errors
        ingests_while_writing += 1
        rows_seen_while_writing += report.train_rows
        time.sleep(0.1)
    for process in writers:
        process.join()
        assert process.exitcode == 0
    ingest(tmp_path)

    assert ingests_while_writing >= 2 and rows_seen_while_writing > 0  # the loop really overlapped the writers
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 32_000
    assert scalar(tmp_path, "SELECT count(DISTINCT (run_id, step)) FROM train") == 32_000
    per_run = query(
        "SELECT run_id, count(*) n, min(step) lo, max(step) hi FROM train GROUP BY run_id", tmp_path, ingest_first=False
    )
    assert per_run.height == 16
    assert per_run["n"].to_list() == [2000] * 16 and set(per_run["lo"]) == {0} and set(per_run["hi"]) == {1999}
    wrong = "SELECT count(*) FROM train WHERE abs(loss - (CAST(substr(run_id, 2) AS INT) + step * 1e-4)) > 1e-9"
    assert scalar(tmp_path, wrong) == 0


def test_two_ingest_processes_and_a_query_at_once_all_succeed_with_exact_counts(tmp_path):
    for rank in range(40):
        make_run(tmp_path, rank, 1000, evals=(eval_row(999, 1, 30.0 + rank),))
    command = [sys.executable, "-m", "cmscale.results"]  # the `cmscale results` group itself
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            command + ["ingest", "--root", str(tmp_path), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ),
        subprocess.Popen(
            command + ["ingest", "--root", str(tmp_path), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ),
        subprocess.Popen(
            command + ["query", "SELECT count(*) AS n FROM train", "--root", str(tmp_path), "--format", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ),
    ]
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    reports = [json.loads(outputs[i][0]) for i in (0, 1)]
    # Ingests take turns: whichever of the three went first (the query ingests first too) parsed
    # every row, and the others found nothing new.
    assert sorted(r["train_rows"] for r in reports) in ([0, 0], [0, 40_000])
    assert json.loads(outputs[2][0]) == [{"n": 40_000}]
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 40_000
    assert scalar(tmp_path, "SELECT count(*) FROM evals") == 40
    assert scalar(tmp_path, "SELECT count(*) FROM runs WHERE status = 'done'") == 40


def test_ingest_waits_with_backoff_while_another_process_holds_the_database(tmp_path):
    make_run(tmp_path, 0, 50)
    ingest(tmp_path)
    make_run(tmp_path, 1, 50)
    holder = subprocess.Popen(  # e.g. a notebook holding a read-write connection for two seconds
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "time.sleep(2); c.close()", str(tmp_path / "cmscale.duckdb")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match="locked"):
            ingest(tmp_path, timeout_s=0.3)
        report = ingest(tmp_path)  # waits until the holder lets go
    finally:
        holder.wait(timeout=60)
    assert report.train_rows == 50 and report.lock_wait_s > 0.3
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 100


# ----------------------------------------------------------------------------- incremental ingest


def test_torn_last_line_is_skipped_with_a_warning_then_ingested_once(tmp_path):
    run_dir = make_run(tmp_path, 0, 5, done=False)
    path = run_dir / "metrics.jsonl"
    line = json.dumps(train_row(0, 5)) + "\n"
    with open(path, "a") as handle:  # a job killed in the middle of a write
        handle.write(line[:20])
    report = ingest(tmp_path)
    assert report.torn_files == [str(path)]
    assert any(str(path) in w and "incomplete last line" in w for w in report.warnings)
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 5

    with open(path, "a") as handle:
        handle.write(line[20:])
    report = ingest(tmp_path)
    assert report.train_rows == 1 and not report.torn_files
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 6
    assert scalar(tmp_path, "SELECT loss FROM train WHERE step = 5") == pytest.approx(5e-4)
    assert ingest(tmp_path).bytes_parsed == 0
    assert scalar(tmp_path, "SELECT count(DISTINCT step) FROM train") == 6


def test_torn_line_dropped_by_a_resumed_writer_leaves_each_step_once(tmp_path):
    run_dir = make_run(tmp_path, 1, 5, done=False)
    path = run_dir / "metrics.jsonl"
    with open(path, "a") as handle:
        handle.write(json.dumps(train_row(1, 5))[:15])
    ingest(tmp_path)
    with MetricsWriter(path) as writer:  # the resumed job drops the fragment and writes step 5 again
        for step in (5, 6):
            writer.write(train_row(1, step))
    report = ingest(tmp_path)
    assert not report.torn_files and not report.reset_files  # bytes before the offset are unchanged
    assert query("SELECT step FROM train ORDER BY step", tmp_path, ingest_first=False)["step"].to_list() == list(
        range(7)
    )


def test_noop_reingest_parses_nothing_and_changes_nothing(tmp_path):
    for rank in range(12):
        make_run(tmp_path, rank, 300, evals=(eval_row(299, 1, 20.0), eval_row(299, 2, 15.0)))
    atomic_write_json(tmp_path / SWEEP / "sweep.json", {"sweep": SWEEP, "spec_path": "spec.toml", "runs": []})
    atomic_write_json(
        tmp_path / SWEEP / "r00" / "trial.json",
        {
            "study": "s",
            "trial_number": 0,
            "state": "COMPLETE",
            "params": {"lr": 1e-3},
            "values": [20.0],
            "run_id": "r00",
            "updated": 1.7e9,
        },
    )
    first = ingest(tmp_path, batch_bytes=1)  # one metrics file per transaction
    assert first.train_rows == 3600 and first.eval_rows == 24 and first.runs == 12 and first.trials == 1
    assert first.transactions == 12
    before = table_fingerprint(tmp_path)
    db_mtime = (tmp_path / "cmscale.duckdb").stat().st_mtime_ns
    second = ingest(tmp_path)
    assert (second.bytes_parsed, second.metrics_files_read, second.transactions) == (0, 0, 0)
    assert not second.changed
    assert table_fingerprint(tmp_path) == before
    assert (tmp_path / "cmscale.duckdb").stat().st_mtime_ns == db_mtime  # not even opened for writing


def test_resume_rewrite_replaces_the_runs_rows_and_each_step_is_stored_once(tmp_path):
    run_dir = make_run(tmp_path, 2, 100, done=False, evals=(eval_row(50, 1, 40.0),))
    path = run_dir / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write(eval_row(99, 1, 30.0))
    ingest(tmp_path)
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 100

    # The job died after step 99; its last checkpoint was step 59.
    truncate_metrics_after(path, 59)
    report = ingest(tmp_path)
    assert report.reset_files == [str(path)]
    assert scalar(tmp_path, "SELECT max(step) FROM train") == 59
    assert query("SELECT step FROM evals", tmp_path, ingest_first=False)["step"].to_list() == [50]

    with MetricsWriter(path) as writer:  # the resumed job logs steps 60.. again (new wall times)
        for step in range(60, 160):
            writer.write(train_row(2, step, wall_s=123.0))
    ingest(tmp_path)
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 160
    assert scalar(tmp_path, "SELECT count(DISTINCT step) FROM train") == 160
    assert scalar(tmp_path, "SELECT count(*) FROM train WHERE step >= 60 AND wall_s = 123.0") == 100

    # A rewrite and a longer re-append between two ingests (the file grew past the old offset).
    truncate_metrics_after(path, 99)
    with MetricsWriter(path) as writer:
        for step in range(100, 200):
            writer.write(train_row(2, step, wall_s=456.0))
    assert ingest(tmp_path).reset_files == [str(path)]
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 200
    assert scalar(tmp_path, "SELECT count(*) FROM train WHERE wall_s = 456.0") == 100

    # Rewritten in place (same inode) with different earlier bytes: caught by the fingerprint.
    rows = [train_row(2, step, wall_s=7.0) for step in range(250)]
    with open(path, "w") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    assert ingest(tmp_path).reset_files == [str(path)]
    assert scalar(tmp_path, "SELECT count(*) FROM train WHERE wall_s = 7.0") == 250
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 250


def test_removed_files_and_run_directories_leave_the_database_too(tmp_path):
    import shutil

    for rank in range(3):
        make_run(tmp_path, rank, 10)
    ingest(tmp_path)
    (tmp_path / SWEEP / "r00" / "metrics.jsonl").unlink()
    shutil.rmtree(tmp_path / SWEEP / "r01")
    report = ingest(tmp_path)
    assert report.runs_deleted == 1
    assert query("SELECT run_id, count(*) n FROM train GROUP BY run_id", tmp_path, ingest_first=False).rows() == [
        ("r02", 10)
    ]
    assert query("SELECT run_id FROM runs ORDER BY run_id", tmp_path, ingest_first=False)["run_id"].to_list() == [
        "r00",
        "r02",
    ]
    assert ingest(tmp_path).transactions == 0


# ----------------------------------------------------------------------------- errors and read-only


def test_malformed_config_and_done_are_reported_with_their_paths_and_others_ingest(tmp_path):
    bad_config = make_run(tmp_path, 0, 10) / "config.json"
    bad_done = make_run(tmp_path, 1, 10) / "done.json"
    make_run(tmp_path, 2, 10)
    bad_config.write_text('{"method": "ect", "preset": ')
    bad_done.write_text("[1, 2]")
    report = ingest(tmp_path)
    assert {problem.path for problem in report.errors} == {str(bad_config), str(bad_done)}
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 30
    runs = query("SELECT run_id, method, status FROM runs ORDER BY run_id", tmp_path, ingest_first=False)
    assert runs.rows() == [("r00", None, "done"), ("r01", "ect", "done"), ("r02", "ect", "done")]
    # r01's done.json is unreadable, so its status falls back to status.json's state.

    result = CliRunner().invoke(results_group, ["ingest", "--root", str(tmp_path), "--strict"])
    assert result.exit_code == 1
    assert str(bad_config) in result.output and str(bad_done) in result.output  # re-reported while unchanged

    atomic_write_json(bad_config, config_of("r00", 0))
    assert {problem.path for problem in ingest(tmp_path).errors} == {str(bad_done)}
    assert scalar(tmp_path, "SELECT method FROM runs WHERE run_id = 'r00'") == "ect"


@pytest.mark.parametrize(
    "statement", ["DELETE FROM train", "DROP TABLE runs", "INSERT INTO train VALUES ('s', 'x', 1, 1, 1.0, 1.0, 1.0)"]
)
def test_query_refuses_writes(tmp_path, statement):
    make_run(tmp_path, 0, 10)
    ingest(tmp_path)
    result = CliRunner().invoke(results_group, ["query", statement, "--root", str(tmp_path)])
    assert result.exit_code != 0
    assert "refused" in result.output and "read-only" in result.output
    with pytest.raises(ReadOnlyQueryError):
        query(statement, tmp_path)
    with connect(tmp_path) as con, pytest.raises(duckdb.Error, match="read-only"):
        con.execute(statement)  # the connection itself is read-only too
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 10
    assert scalar(tmp_path, "SELECT count(*) FROM runs") == 1


# ----------------------------------------------------------------------------- schema, views, export


def test_views_planned_runs_trials_and_schema_version(tmp_path):
    make_run(
        tmp_path,
        0,
        101,
        evals=(eval_row(50, 1, 40.0), eval_row(50, 2, 35.0), eval_row(100, 1, 25.0), eval_row(100, 2, 20.0)),
    )
    with MetricsWriter(tmp_path / SWEEP / "r00" / "metrics.jsonl") as writer:
        writer.write({**train_row(0, 101), "loss": float("nan")})  # json.dumps writes NaN; still ingested
    atomic_write_json(
        tmp_path / SWEEP / "sweep.json",
        {
            "sweep": SWEEP,
            "spec_path": "sweep.toml",
            "runs": [
                {"run_id": "r00", "config": config_of("r00", 0), "iterations": 100, "flops_per_step": 1e9},
                {
                    "run_id": "r09",
                    "config": {**config_of("r09", 9), "params": None},
                    "iterations": 100,
                    "flops_per_step": 1e9,
                },
            ],
        },
    )
    atomic_write_json(
        tmp_path / SWEEP / "r00" / "trial.json",
        {
            "study": "st",
            "trial_number": 3,
            "state": "PRUNED",
            "params": {"lr": 0.01},
            "values": None,
            "run_id": "r00",
            "updated": 1.7e9,
        },
    )
    ingest(tmp_path)
    latest = query(
        "SELECT sampler_steps, step, fid FROM latest_eval ORDER BY sampler_steps", tmp_path, ingest_first=False
    )
    assert latest.rows() == [(1, 100, 25.0), (2, 100, 20.0)]
    summary = query("SELECT * FROM run_summary ORDER BY run_id", tmp_path, ingest_first=False)
    assert summary["run_id"].to_list() == ["r00", "r09"]
    assert summary["status"].to_list() == ["done", "planned"]
    assert summary["fid_1step"][0] == 25.0 and summary["fid_2step"][0] == 20.0
    assert summary["last_train_step"][0] == 101 and summary["final_loss"].is_nan()[0]
    assert summary["budget_flops"].to_list() == [1e11, 1e11]  # iterations x FLOPs per step
    assert scalar(tmp_path, "SELECT n_runs FROM sweeps") == 2
    trial = query(
        "SELECT study, trial_number, state, params_json->>'lr' AS lr, values_json FROM trials",
        tmp_path,
        ingest_first=False,
    )
    assert trial.rows() == [("st", 3, "PRUNED", "0.01", None)]
    with connect(tmp_path, read_only=False) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        assert migrate(con) == []  # already current


def test_a_version_1_store_is_rebuilt_from_the_folders_and_evals_before_kid_keep_null(tmp_path):
    from cmscale.results.schema import MIGRATIONS

    make_run(tmp_path, 0, 10, evals=(eval_row(9, 1, 30.0),))
    with duckdb.connect(str(tmp_path / "cmscale.duckdb")) as con:  # the store as schema version 1 left it
        con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description VARCHAR, "
                    "applied_at TIMESTAMP)")
        MIGRATIONS[0][2](con)
        con.execute("INSERT INTO schema_version VALUES (1, 'v1', now())")
        con.execute("INSERT INTO evals (run_id, step, sampler_steps, fid, num_samples, extractor) "
                    "VALUES ('old', 5, 1, 50.0, 300, 'x')")
    with MetricsWriter(tmp_path / SWEEP / "r00" / "metrics.jsonl") as writer:
        writer.write({**eval_row(10, 1, 20.0), "kid": 0.25, "kid_std": 0.5})
    ingest(tmp_path)
    sql = "SELECT run_id, step, fid, kid, kid_std, num_samples FROM evals ORDER BY run_id, step"
    rows = query(sql, tmp_path, ingest_first=False).rows()
    # Schema 2 rebuilds from the run folders (schema 1 could merge runs of two sweeps), so the row
    # with no folder behind it is gone; the eval written before KID existed keeps NULL there.
    assert rows == [("r00", 9, 30.0, None, None, 500), ("r00", 10, 20.0, 0.25, 0.5, 500)]
    assert query("SELECT kid FROM latest_eval WHERE run_id = 'r00'", tmp_path, ingest_first=False).rows() == [(0.25,)]
    assert scalar(tmp_path, "SELECT max(version) FROM schema_version") == SCHEMA_VERSION >= 2


def test_export_parquet_matches_the_query(tmp_path):
    for rank in range(3):
        make_run(tmp_path, rank, 20, evals=(eval_row(19, 1, 10.0 + rank),))
    out = tmp_path / "out" / "summary.parquet"
    result = CliRunner().invoke(results_group, ["export", "run_summary", "--out", str(out), "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    exported = pl.read_parquet(out).sort("run_id")
    assert exported.select("run_id", "fid_1step", "final_loss").rows() == query(
        "SELECT run_id, fid_1step, final_loss FROM run_summary ORDER BY run_id", tmp_path, ingest_first=False).rows()
    bad = CliRunner().invoke(results_group, ["export", "nope", "--out", str(out), "--root", str(tmp_path)])
    assert bad.exit_code != 0 and "run_summary" in bad.output
