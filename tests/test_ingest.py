"""Ingest never lets one run block a root, never replaces one eval's number with another's, reads a
line the same way whichever parser reads it, and forgets a sweep whose folder is gone. Run folders
written with the real writers; a real DuckDB file."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner
from test_store import SWEEP, eval_row, make_run

from cmscale.cli.results import results_group
from cmscale.results import ingest, query
from cmscale.rundir import MetricsWriter, atomic_write_json


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
