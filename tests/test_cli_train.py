"""`cmscale train` (cmscale.cli.train): bad input is one clean error naming the field, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from cmscale.cli import main


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("name", ["../escape", "..", "."])
def test_train_cli_writes_nothing_outside_the_root(tmp_path, name):
    toml = tmp_path / "run.toml"
    toml.write_text(tomli_w.dumps({"method": "edm", "preset": "xxs", "budget_iters": 1, "sweep": name}))
    root = tmp_path / "deep" / "root"
    result = CliRunner().invoke(main, ["train", str(toml), "--root", str(root)])
    assert result.exit_code == 1 and "sweep" in result.output and "not a safe folder name" in result.output
    assert files_under(tmp_path) == ["run.toml"]
    toml.write_text(tomli_w.dumps({"method": "edm", "preset": "xxs", "budget_iters": 1, "run_id": "../../x"}))
    result = CliRunner().invoke(main, ["train", str(toml), "--root", str(root)])
    assert result.exit_code == 1 and "run_id" in result.output
    assert files_under(tmp_path) == ["run.toml"]


def test_inf_budget_on_the_command_line_is_a_clean_error(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "edm"\npreset = "xxs"\nbudget_flops = inf\n')
    result = CliRunner().invoke(main, ["train", str(toml), "--root", str(tmp_path / "r")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1  # a ClickException, not OverflowError
    assert "budget_flops" in result.output and "finite" in result.output
    assert not (tmp_path / "r").exists()
