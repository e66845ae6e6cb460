"""The config edge (cmscale.config): overrides, TOML files and integer bounds give one message naming
the file, the field and the fix, never a traceback from deep inside."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cmscale.cli.main import main
from cmscale.config import ConfigError, RunConfig, load_run_config, safe_path_component

RUN = 'method = "edm"\npreset = "xxs"\nbudget_iters = 2\nlr = 0.001\n'


def test_set_into_a_value_names_the_key_and_the_fix(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN)
    with pytest.raises(ConfigError, match=r"(?s)run.toml \(with --set lr.x=1\).*lr.x: lr is a value \(0.001\)"):
        load_run_config(path, {"lr.x": 1})
    result = CliRunner().invoke(main, ["train", str(path), "--set", "lr.x=1", "--root", str(tmp_path)])
    assert result.exit_code != 0 and "lr is a value" in result.output and "Traceback" not in result.output


def test_a_non_utf8_run_file_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(RUN.encode() + b'# caf\xe9\n')
    with pytest.raises(ConfigError, match="run.toml: not UTF-8 text"):
        load_run_config(path)


@pytest.mark.parametrize("seed", [2**31, 2**64, -1])
def test_a_seed_the_store_cannot_hold_is_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        RunConfig(method="edm", preset="xxs", budget_iters=2, seed=seed)
    RunConfig(method="edm", preset="xxs", budget_iters=2, seed=2**31 - 1)


def test_a_trailing_newline_is_not_part_of_a_safe_name():
    with pytest.raises(ValueError, match="not a safe folder name"):
        safe_path_component("abc\n")
    assert safe_path_component("abc") == "abc"
