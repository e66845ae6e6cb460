"""Ingest (cmscale.results.ingest) never lets one run block a root, never replaces one eval's number with
another's, reads a line the same way whichever parser reads it, and forgets a sweep whose folder is gone;
exact counts under concurrent writers and ingests, resume rewrites, no-op re-ingest, a run is (sweep,
run_id). Run folders written with the real writers; a real DuckDB file."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from run_folders import SWEEP, config_of, eval_row, make_run, rows, scalar, table_fingerprint, train_row, write_run

from cmscale.cli.results import results_group
from cmscale.results import StoreError, ingest, query
from cmscale.rundir import MetricsWriter, atomic_write_json, truncate_metrics_after


def test_a_seed_the_store_cannot_hold_is_reported_and_every_run_lands(tmp_path):
    bad = make_run(tmp_path, 0, 10)
    make_run(tmp_path, 1, 7)
    config = json.loads((bad / "config.json").read_text())
    atomic_write_json(bad / "config.json", config | {"seed": 2147483648})
    result = CliRunner().invoke(results_group, ["ingest", "--root", str(tmp_path)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "'seed' = 2147483648" in result.output and str(bad) in result.output
    rows = query("SELECT run_id, seed, status FROM runs ORDER BY run_id", tmp_path, ingest_first=False).rows()
    assert rows == [("r00", None, "done"), ("r01", 1, "done")]
    assert query("SELECT count(*) FROM train", tmp_path, ingest_first=False).item() == 17


def test_an_eval_with_fewer_samples_never_replaces_another(tmp_path):
    run_dir = make_run(tmp_path, 0, 10, evals=(eval_row(9, 1, 916.25),))
    ingest(tmp_path)
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:  # `cmscale eval RUN --num-samples 20`
        writer.write(eval_row(9, 1, 933.68) | {"num_samples": 20})
    ingest(tmp_path)
    rows = query("SELECT num_samples, fid FROM evals ORDER BY num_samples", tmp_path, ingest_first=False).rows()
    assert rows == [(20, 933.68), (500, 916.25)]
    # The summary reads the eval with the most samples at the last step.
    assert query("SELECT fid_1step FROM run_summary", tmp_path, ingest_first=False).item() == 916.25
    # The same eval repeated is still one row (the key holds, the latest value wins).
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:
        writer.write(eval_row(9, 1, 916.0))
    ingest(tmp_path)
    rows = query("SELECT num_samples, fid FROM evals ORDER BY num_samples", tmp_path, ingest_first=False).rows()
    assert rows == [(20, 933.68), (500, 916.0)]


def test_a_duplicate_key_means_the_same_with_or_without_a_bad_line_nearby(tmp_path):
    line = b'{"kind": "train", "step": 3, "loss": 1.0, "loss": 2.0}\n'
    stored = []
    for neighbour in (b"", b"not json\n"):
        root = tmp_path / f"case{len(stored)}"
        run_dir = make_run(root, 0, 3)
        with open(run_dir / "metrics.jsonl", "ab") as handle:
            handle.write(line + neighbour)
        ingest(root)
        stored.append(query("SELECT loss FROM train WHERE step = 3", root, ingest_first=False).item())
    assert stored == [1.0, 1.0]


def test_a_deleted_sweep_folder_leaves_the_store(tmp_path):
    make_run(tmp_path, 0, 5)
    atomic_write_json(tmp_path / SWEEP / "sweep.json", {"sweep": SWEEP, "spec_path": "x.toml", "runs": []})
    ingest(tmp_path)
    assert query("SELECT count(*) FROM sweeps", tmp_path, ingest_first=False).item() == 1
    shutil.rmtree(tmp_path / SWEEP)
    ingest(tmp_path)
    counts = query("SELECT (SELECT count(*) FROM sweeps), (SELECT count(*) FROM runs), (SELECT count(*) FROM train)",
                   tmp_path, ingest_first=False).rows()
    assert counts == [(0, 0, 0)]


def test_an_eval_row_beyond_the_stores_integer_columns_is_skipped_alone(tmp_path):
    make_run(tmp_path, 0, 5, evals=(eval_row(4, 1, 10.0), eval_row(4, 2, 20.0) | {"sampler_steps": 2**40}))
    make_run(tmp_path, 1, 3)
    report = ingest(tmp_path)
    assert any("beyond 32 bits" in problem.message for problem in report.errors)
    assert query("SELECT sampler_steps, fid FROM evals", tmp_path, ingest_first=False).rows() == [(1, 10.0)]
    assert query("SELECT count(*) FROM train", tmp_path, ingest_first=False).item() == 8


# ----------------------------------------------------------------------------- guidance and EMA in the eval key


def _power_ema_run(root, rank: int, width: float = 0.1):
    """A finished run whose own EMA is a power EMA of ``width`` (config ema_sigma_rels), with one eval."""
    run_dir = make_run(root, rank, 10, evals=(eval_row(9, 1, 30.0),))
    config = json.loads((run_dir / "config.json").read_text())
    atomic_write_json(run_dir / "config.json", config | {"ema_sigma_rels": [width, 0.05], "phema_every": 5})
    return run_dir


def test_a_runs_own_eval_records_the_width_of_its_evaluated_ema(tmp_path):
    _power_ema_run(tmp_path, 0, width=0.1)
    make_run(tmp_path, 1, 10, evals=(eval_row(9, 1, 40.0),))  # a classic ema_rates average: no width
    ingest(tmp_path)
    rows = query("SELECT run_id, ema_sigma_rel, ema_posthoc FROM evals ORDER BY run_id", tmp_path,
                 ingest_first=False).rows()
    assert rows == [("r00", 0.1, False), ("r01", None, False)]


def test_a_posthoc_ema_eval_lands_beside_the_runs_own_and_replaces_neither(tmp_path):
    run_dir = _power_ema_run(tmp_path, 0, width=0.1)
    ingest(tmp_path)
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:  # `cmscale eval RUN --ema-sigma-rel W`
        for width, fid in ((0.05, 25.0), (0.1, 29.5)):  # 0.1 is also the run's own EMA: a reconstruction of it
            writer.write(eval_row(9, 1, fid) | {"kind": "eval-ema", "ema_sigma_rel": width})
    ingest(tmp_path)
    rows = query("SELECT ema_posthoc, ema_sigma_rel, fid FROM evals ORDER BY ema_posthoc, ema_sigma_rel", tmp_path,
                 ingest_first=False).rows()
    assert rows == [(False, 0.1, 30.0), (True, 0.05, 25.0), (True, 0.1, 29.5)]
    # The summary reads the run's own EMA.
    assert query("SELECT fid_1step FROM run_summary", tmp_path, ingest_first=False).item() == 30.0


def test_a_guided_eval_never_replaces_the_unguided_one(tmp_path):
    conditional = {"guidance_kind": "none", "guidance": 1.0, "class_balance": "balanced"}
    run_dir = make_run(tmp_path, 0, 10, evals=(eval_row(9, 1, 50.0) | conditional,))
    ingest(tmp_path)
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:  # the same step sampled with guidance 2
        writer.write(eval_row(9, 1, 20.0) | conditional | {"guidance": 2.0, "guidance_kind": "classifier-free"})
    ingest(tmp_path)
    rows = query("SELECT guidance, guidance_kind, class_balance, fid FROM evals ORDER BY guidance", tmp_path,
                 ingest_first=False).rows()
    assert rows == [(1.0, "none", "balanced", 50.0), (2.0, "classifier-free", "balanced", 20.0)]


def test_a_schema_3_store_migrates_and_gains_the_posthoc_evals_it_never_read(tmp_path):
    """A store written at schema 3 (eval-ema rows ignored, no ema_sigma_rel) with its metrics file
    marked as read: the migration makes the next ingest read it whole again."""
    import os

    import duckdb

    from cmscale.results import SCHEMA_VERSION, migrate

    run_dir = _power_ema_run(tmp_path, 0, width=0.1)
    with MetricsWriter(run_dir / "metrics.jsonl") as writer:
        writer.write(eval_row(9, 1, 25.0) | {"kind": "eval-ema", "ema_sigma_rel": 0.05})
    metrics = run_dir / "metrics.jsonl"
    stat = os.stat(metrics)
    with duckdb.connect(str(tmp_path / "cmscale.duckdb")) as con:
        assert migrate(con, target=3) == [1, 2, 3]
        con.execute("INSERT INTO evals (sweep, run_id, step, sampler_steps, fid, num_samples, extractor) "
                    "VALUES (?, 'r00', 9, 1, 30.0, 500, 'digits-classifier')", [SWEEP])
        con.execute("INSERT INTO ingest_files (path, sweep, run_id, size, mtime_ns, inode, consumed) "
                    "VALUES (?, ?, 'r00', ?, ?, ?, ?)",
                    [f"{SWEEP}/r00/metrics.jsonl", SWEEP, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_size])
    ingest(tmp_path)
    assert query("SELECT max(version) FROM schema_version", tmp_path, ingest_first=False).item() == SCHEMA_VERSION == 4
    rows = query("SELECT ema_posthoc, ema_sigma_rel, fid FROM evals ORDER BY ema_posthoc", tmp_path,
                 ingest_first=False).rows()
    assert rows == [(False, 0.1, 30.0), (True, 0.05, 25.0)]
    assert query("SELECT count(*) FROM train", tmp_path, ingest_first=False).item() == 10


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


# ---------------------------------------------------------------------------------------------
# A run is (sweep, run_id); concurrent writers and ingests; re-ingest, resume rewrites, removed folders


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
