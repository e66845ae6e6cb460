"""The store's schema (cmscale.results.schema): views, the schema version, and older stores migrated and
rebuilt from the run folders."""

from __future__ import annotations

import duckdb
from run_folders import SWEEP, config_of, eval_row, make_run, rows, scalar, train_row, write_run

from cmscale.results import SCHEMA_VERSION, connect, ingest, migrate, query
from cmscale.results.schema import MIGRATIONS
from cmscale.rundir import MetricsWriter, atomic_write_json


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
