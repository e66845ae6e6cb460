"""`cmscale eval RUN_DIR`: a relative RUN_DIR cannot climb out of the results root (eval rows are
appended to the run's metrics.jsonl)."""

from __future__ import annotations

from click.testing import CliRunner

from cmscale.cli.main import main


def test_eval_refuses_a_run_dir_that_climbs_out_of_the_root(tmp_path, monkeypatch):
    root, other = tmp_path / "root", tmp_path / "other" / "run"
    root.mkdir()
    other.mkdir(parents=True)
    (other / "metrics.jsonl").write_text("")
    monkeypatch.chdir(root)
    result = CliRunner().invoke(main, ["eval", "../other/run", "--root", str(root)])
    assert result.exit_code == 1 and "climbs out" in result.output and "Traceback" not in result.output
    assert (other / "metrics.jsonl").read_text() == ""
