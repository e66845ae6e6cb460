"""Fits of any table: the command line prints what cmscale.analysis.tables returns, and bad input
is refused naming the file, the column, the row and the option."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cmscale.analysis.fit import evaluate_law
from cmscale.analysis.tables import table_frontier, table_power_law
from cmscale.cli import main


def test_the_cli_table_fit_is_the_analysis_fit(tmp_path):
    x = np.logspace(10, 14, 24)
    y = evaluate_law("saturating", {"E": 2.0, "A": 2e5, "alpha": 0.5}, x) * np.exp(
        np.random.default_rng(1).normal(0, 0.02, 24))
    table = pd.DataFrame({"flops": x, "fid": y, "run": np.repeat(np.arange(8), 3)})
    path = tmp_path / "curve.csv"
    table.to_csv(path, index=False)
    fit = table_power_law(table, str(path), x_col="flops", y_col="fid", group_col="run", form="saturating",
                          n_draws=40, seed=2)
    result = CliRunner().invoke(main, ["fit", "powerlaw", "--csv", str(path), "--x-col", "flops", "--y-col", "fid",
                                       "--group-col", "run", "--n-draws", "40", "--seed", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(json.dumps(fit.to_json()))
    assert fit.bootstrap.n_groups == 8 and abs(fit.params["alpha"] - 0.5) < 0.1


def test_bad_tables_are_refused_naming_the_column_the_row_and_the_option():
    table = pd.DataFrame({"N": [1e6, 2e6, 4e6], "C": [1e12, 0.0, 4e12], "fid": [10.0, 9.0, 8.0]})
    with pytest.raises(ValueError, match=r"t\.csv: column 'C' must hold numbers > 0; row 1 has 0\.0"):
        table_frontier(table, "t.csv", size_col="N", compute_col="C", y_col="fid", run_col=None, n_draws=0, seed=0)
    with pytest.raises(ValueError, match=r"t\.csv: no column 'size' \(from --size-col\)"):
        table_frontier(table, "t.csv", size_col="size", compute_col="C", y_col="fid", run_col=None, n_draws=0,
                       seed=0)
    two_sizes = table.assign(C=[1e12, 2e12, 4e12], run=["a", "a", "b"])
    with pytest.raises(ValueError, match="run 'a' has several sizes"):
        table_frontier(two_sizes, "t.csv", size_col="N", compute_col="C", y_col="fid", run_col="run", n_draws=0,
                       seed=0)
