"""`cmscale results query` and the store's connections: user SQL runs in DuckDB's sandbox (no file,
extension or network is reached) and may not write, a time limit and Ctrl-C interrupt the query (not the
process), a store file that cannot be used (empty, truncated, corrupt, newer, on a read-only root) gives
one line naming the file and the fix, and exports equal the query. Real DuckDB files throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner
from run_folders import SWEEP, eval_row, make_run, scalar

from cmscale.cli.results import results_group
from cmscale.results import QueryInterrupted, ReadOnlyQueryError, StoreError, connect, ingest, query, read_query
from cmscale.rundir import DB_FILE

ESCAPES = [
    "COPY (SELECT 1 AS garbage) TO '{metrics}' (FORMAT csv)",
    "EXPORT DATABASE '{root}/exported'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('{metrics}')",
    "SELECT * FROM '{metrics}'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "ATTACH '{root}/other.duckdb'",
    "SET enable_external_access = true",
    "SELECT 1; COPY (SELECT 2) TO '{root}/x.csv'",
]


def _query(root: Path, *args: str):
    return CliRunner().invoke(results_group, ["query", *args, "--root", str(root)])


@pytest.mark.parametrize("template", ESCAPES)
def test_user_sql_reaches_no_file_extension_or_setting(tmp_path, template):
    run_dir = make_run(tmp_path, 0, 10)
    metrics = run_dir / "metrics.jsonl"
    before = metrics.read_bytes()
    result = _query(tmp_path, template.format(metrics=metrics, root=tmp_path))
    assert result.exit_code == 1 and "refused" in result.output, result.output
    assert "Traceback" not in result.output
    assert metrics.read_bytes() == before
    assert not (tmp_path / "exported").exists() and not (tmp_path / "x.csv").exists()
    assert not (tmp_path / "other.duckdb").exists()
    # The run's rows are all still there after the next ingest.
    assert query("SELECT count(*) FROM train", tmp_path).item() == 10


def test_sandbox_refuses_file_functions_even_past_the_statement_check(tmp_path):
    """The sandbox, not the statement list, is the guard: a table function inside a SELECT."""
    make_run(tmp_path, 0, 3)
    ingest(tmp_path)
    with pytest.raises(ReadOnlyQueryError, match="sandbox"):
        read_query("SELECT * FROM read_json_auto('/etc/hostname')", tmp_path)
    assert read_query("SELECT count(*) AS n FROM train", tmp_path).item() == 3


def test_a_query_past_its_time_limit_is_interrupted_and_the_process_lives_on(tmp_path):
    make_run(tmp_path, 0, 3)
    ingest(tmp_path)
    started = time.monotonic()
    with pytest.raises(QueryInterrupted, match="time limit of 0.5 s"):
        read_query("SELECT count(*) FROM range(1000000000000000)", tmp_path, query_timeout_s=0.5)
    assert time.monotonic() - started < 30
    assert read_query("SELECT count(*) AS n FROM train", tmp_path).item() == 3  # the store still answers
    result = _query(tmp_path, "SELECT count(*) FROM range(1000000000000000)", "--timeout", "0.5", "--no-ingest")
    assert result.exit_code == 1 and "--timeout" in result.output and "Traceback" not in result.output


def test_ctrl_c_stops_a_query_with_one_line(tmp_path):
    make_run(tmp_path, 0, 3)
    ingest(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # As from a terminal: a runner started in the background may hand SIGINT down ignored.
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from cmscale.cli.results import results_group; "
            "results_group(['query', 'SELECT count(*) FROM range(1000000000000000)', '--no-ingest', "
            f"'--root', {str(tmp_path)!r}])")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    # Signal once the command holds the store open (imports done, inside the command), not after a
    # fixed sleep: on a loaded machine the imports alone can outlast any sleep.
    store = str(tmp_path / DB_FILE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not _holds_open(process.pid, store):
        time.sleep(0.1)
    time.sleep(1.0)  # the query is running
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, (out, err)
    assert "Ctrl-C" in err and "Traceback" not in err


def _holds_open(pid: int, path: str) -> bool:
    """Whether process ``pid`` has ``path`` open (read from /proc)."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_store_gives_one_line_naming_it_and_the_fix(tmp_path, damage):
    make_run(tmp_path, 0, 5)
    ingest(tmp_path)
    store = tmp_path / DB_FILE
    data = store.read_bytes()
    store.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "garbage": b"not duckdb" * 500}[damage])
    for args in (["query", "SELECT 1"], ["ingest"]):
        result = CliRunner().invoke(results_group, [*args, "--root", str(tmp_path)])
        assert result.exit_code == 1, result.output
        assert str(store) in result.output and "mv " in result.output and "Traceback" not in result.output
    # The advice works: moved aside, the store is rebuilt from the run folders with nothing lost.
    store.rename(store.with_suffix(".bad"))
    assert query("SELECT count(*) FROM train", tmp_path).item() == 5


def test_a_newer_schema_store_is_refused_with_the_fix(tmp_path):
    make_run(tmp_path, 0, 5)
    ingest(tmp_path)
    with duckdb.connect(str(tmp_path / DB_FILE)) as con:
        con.execute("INSERT INTO schema_version VALUES (99, 'from the future', now())")
    for args in (["query", "SELECT 1"], ["ingest"], ["query", "SELECT 1", "--no-ingest"]):
        result = CliRunner().invoke(results_group, [*args, "--root", str(tmp_path)])
        assert result.exit_code == 1 and "schema version 99" in result.output and "upgrade cmscale" in result.output
        assert "Traceback" not in result.output


@pytest.fixture
def read_only_root(tmp_path):
    """A results root on a read-only file system (a read-only tmpfs mount as root, else chmod)."""
    root = tmp_path / "ro"
    root.mkdir()
    if os.geteuid() == 0:
        staging = tmp_path / "staging"
        make_run(staging, 0, 5)
        ingest(staging)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)]).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        subprocess.run(["cp", "-a", f"{staging}/.", str(root)], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        yield root
        subprocess.run(["umount", str(root)], check=False)
    else:
        make_run(root, 0, 5)
        ingest(root)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        yield root
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_read_only_root_is_queried_as_it_is_and_ingest_says_why_not(read_only_root):
    result = _query(read_only_root, "SELECT count(*) AS n FROM train", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "5"
    result = CliRunner().invoke(results_group, ["ingest", "--root", str(read_only_root)])
    assert "Traceback" not in result.output
    if result.exit_code:  # nothing to ingest may succeed without writing; writing must fail in one line
        assert str(read_only_root) in result.output


def test_ingest_on_a_full_disk_is_one_line_and_the_next_ingest_completes(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    root = tmp_path / "full"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        make_run(root, 0, 5)
        ingest(root)
        make_run(root, 1, 200)  # new rows in a run folder, then the disk fills before they are ingested
        with open(root / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 1024)
            except OSError:
                pass
        result = CliRunner().invoke(results_group, ["ingest", "--root", str(root)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert str(root / DB_FILE) in result.output and "free space" in result.output, result.output
        assert not list(root.glob(".*.tmp"))
        (root / "filler").unlink()
        assert query("SELECT count(*) FROM train", root).item() == 205
    finally:
        subprocess.run(["umount", str(root)], check=False)


def test_query_still_returns_results_and_exports(tmp_path):
    make_run(tmp_path, 0, 4)
    out = tmp_path / "out.csv"
    result = _query(tmp_path, f"SELECT count(*) AS n FROM train WHERE sweep = '{SWEEP}'", "--format", "csv",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines() == ["n", "4"]
    with pytest.raises(StoreError):
        read_query("DELETE FROM train", tmp_path)


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
