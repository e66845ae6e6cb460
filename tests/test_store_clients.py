"""The store opens in other clients, and tables print whole values.

- The DuckDB CLI from PyPI (duckdb-cli, installed by setup's dev extra) reads the store: the store is
  written at an older storage version (``STORAGE_VERSION``) that it supports.
- `results query` and every table print values whole: CSV into a pipe, folded cells in a terminal.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console
from rich.table import Table
from run_folders import write_run

from cmscale.cli import main, options
from cmscale.results import ingest

LONG_FLOAT = 1234567890123.4568  # 17 significant digits: what an 80-column table cut to "1.2e+…"


def duckdb_cli() -> str | None:
    """The `duckdb` shell: beside this interpreter (the venv's bin) or on PATH."""
    beside = Path(sys.executable).with_name("duckdb")
    return str(beside) if beside.is_file() else shutil.which("duckdb")


@pytest.fixture
def store(tmp_path):
    write_run(tmp_path, "sw", "run-a", [1.0, 0.5, 0.25], fid=LONG_FLOAT)
    write_run(tmp_path, "sw", "run-b" + "-long" * 12, [2.0, 1.0], fid=3.5)
    ingest(tmp_path)
    return tmp_path


def test_the_duckdb_cli_from_pypi_opens_the_store_and_reads_a_row(store):
    cli = duckdb_cli()
    if cli is None:
        pytest.skip("no `duckdb` shell installed (pip install duckdb-cli; scripts/setup.sh installs it)")
    version = subprocess.run([cli, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    answer = subprocess.run(
        [cli, "-readonly", "-csv", str(store / "cmscale.duckdb"), "-c",
         "SELECT run_id, fid FROM latest_eval JOIN runs USING (sweep, run_id) WHERE run_id = 'run-a'"],
        capture_output=True, text=True, timeout=60,
    )
    assert answer.returncode == 0, f"duckdb {version}: {answer.stderr}"
    rows = list(csv.reader(io.StringIO(answer.stdout)))
    assert rows[0] == ["run_id", "fid"]
    assert rows[1][0] == "run-a" and float(rows[1][1]) == LONG_FLOAT


def test_query_into_a_pipe_is_csv_with_whole_values(store):
    result = CliRunner().invoke(main, ["results", "query", "--root", str(store), "--no-ingest",
                                       "SELECT run_id, fid FROM latest_eval ORDER BY run_id"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["run_id", "fid"]
    assert rows[1] == ["run-a", repr(LONG_FLOAT)]
    assert rows[2][0] == "run-b" + "-long" * 12


def test_a_table_in_a_narrow_terminal_folds_cells_instead_of_cutting_them(monkeypatch):
    terminal = Console(file=io.StringIO(), force_terminal=True, width=30, color_system=None)
    monkeypatch.setattr(options, "console", terminal)
    table = Table(title="t")
    table.add_column("run")
    table.add_column("value", justify="right")
    table.add_row("run-b" + "-long" * 12, f"{57436123:,}")
    table.add_row("run-a", repr(LONG_FLOAT))
    options.print_table(table)
    text = terminal.file.getvalue()
    assert "…" not in text
    # Folded cells: the characters of each value appear in order once the borders are removed.
    inside = "".join(ch for ch in text if ch not in "│┃┏┓┗┛┡┩└┘━─┳┻╇╈┼ \n")
    assert "57,436,123" in inside
    assert repr(LONG_FLOAT) in inside
