"""`cmscale fit`: an option naming nothing in the sweep is refused with the choices, never a silent
empty answer."""

from __future__ import annotations

from click.testing import CliRunner
from test_report import SWEEP, build_sweep

from cmscale.cli.main import main
from cmscale.results import ingest


def test_fit_powerlaw_with_an_unknown_method_names_the_sweeps_methods(tmp_path):
    build_sweep(tmp_path)
    ingest(tmp_path)
    args = ["fit", "powerlaw", "--sweep", SWEEP, "--root", str(tmp_path), "--n-draws", "20"]
    result = CliRunner().invoke(main, [*args, "--method", "nosuch"])
    assert result.exit_code == 2, result.output
    assert "--method" in result.output and "nosuch" in result.output and "ect" in result.output
    assert CliRunner().invoke(main, [*args, "--method", "ect", "--json"]).exit_code == 0
