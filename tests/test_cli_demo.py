"""`cmscale demo` (cmscale.cli.demo): a bad --set names the option."""

from __future__ import annotations

from click.testing import CliRunner

from cmscale.cli import main


def cmscale(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_demo_set_with_a_bad_value_names_the_option(tmp_path):
    result = cmscale("demo", "--out", tmp_path, "--set", "seeds=abc")
    assert result.exit_code == 1
    assert "seeds: Input should be a valid list" in result.output and "--set" in result.output
