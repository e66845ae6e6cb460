"""`cmscale results` (cmscale.cli.results): output formats."""

from __future__ import annotations

import json

import polars as pl
from click.testing import CliRunner

from cmscale.cli import main


def test_csv_output_encodes_nested_columns_as_json(tmp_path):
    sql = "SELECT 'a' AS run, [1, 2] AS steps, {'k': 1.5} AS meta UNION ALL SELECT 'b', NULL, {'k': NULL}"
    result = CliRunner().invoke(main, ["results", "query", sql, "--root", str(tmp_path), "--format", "csv"])
    assert result.exit_code == 0, result.output
    back = pl.read_csv(result.stdout.encode()).sort("run")
    assert back.columns == ["run", "steps", "meta"]
    assert [json.loads(v) if v else None for v in back["steps"]] == [[1, 2], None]
    assert [json.loads(v) for v in back["meta"]] == [{"k": 1.5}, {"k": None}]
