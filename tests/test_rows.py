"""Rows from the run folders (cmscale.results.files, .lines, .rows): one badly typed value or torn line costs one row,
reported with the file, the byte offset and the field; malformed config and done files are named."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from run_folders import config_of, make_run, rows, scalar, train_row

from cmscale.cli import main
from cmscale.cli.results import results_group
from cmscale.results import ingest, query
from cmscale.rundir import MetricsWriter, atomic_write_json


def test_a_badly_typed_value_skips_only_its_row_and_is_reported_with_offset_and_field(tmp_path):
    run_dir = tmp_path / "s" / "r"
    # 5,000 rows: the fallback parses blocks of 2,048 lines, and the bad row sits in the second block.
    lines = [{"kind": "train", "step": step, "loss": 1.0 / step, "wall_s": 0.0} for step in range(1, 5001)]
    lines[2999]["loss"] = "high"
    text = "".join(json.dumps(line) + "\n" for line in lines)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(text)
    offset = len("".join(json.dumps(line) + "\n" for line in lines[:2999]).encode())

    result = CliRunner().invoke(main, ["results", "ingest", "--root", str(tmp_path), "--strict", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["train_rows"] == 4999
    [problem] = report["errors"]
    assert problem["path"] == str(run_dir / "metrics.jsonl")
    for part in (f"byte {offset}", "field 'loss'", "'high'"):
        assert part in problem["message"]
    assert rows(tmp_path, "SELECT count(*), count(*) FILTER (WHERE step = 3000) FROM train") == [(4999, 0)]

    with MetricsWriter(run_dir / "metrics.jsonl") as writer:  # the file goes on; the bad row is not re-read
        writer.write({"kind": "train", "step": 5001, "loss": 0.5, "wall_s": 0.0})
    again = CliRunner().invoke(main, ["results", "ingest", "--root", str(tmp_path), "--strict", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["train_rows"] == 1
    assert rows(tmp_path, "SELECT count(*) FROM train") == [(5000,)]


@pytest.mark.parametrize("line", ['{"kind": "train", "step": "two", "loss": 1.0}',
                                  '{"kind": "train", "step": 2, "loss": [1]}',
                                  '{"kind": "eval", "step": 2, "sampler_steps": 1, "fid": {"x": 1}}',
                                  "not json at all"])
def test_each_kind_of_bad_row_is_an_error_for_strict(tmp_path, line):
    run_dir = tmp_path / "s" / "r"
    run_dir.mkdir(parents=True)
    good = json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n"
    (run_dir / "metrics.jsonl").write_text(good + line + "\n" + good.replace('"step": 1', '"step": 3'))
    report = ingest(tmp_path)
    assert report.train_rows == 2
    [problem] = report.errors
    assert f"byte {len(good)}" in problem.message


def test_torn_last_line_is_skipped_with_a_warning_then_ingested_once(tmp_path):
    run_dir = make_run(tmp_path, 0, 5, done=False)
    path = run_dir / "metrics.jsonl"
    line = json.dumps(train_row(0, 5)) + "\n"
    with open(path, "a") as handle:  # a job killed in the middle of a write
        handle.write(line[:20])
    report = ingest(tmp_path)
    assert report.torn_files == [str(path)]
    assert any(str(path) in w and "incomplete last line" in w for w in report.warnings)
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 5

    with open(path, "a") as handle:
        handle.write(line[20:])
    report = ingest(tmp_path)
    assert report.train_rows == 1 and not report.torn_files
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 6
    assert scalar(tmp_path, "SELECT loss FROM train WHERE step = 5") == pytest.approx(5e-4)
    assert ingest(tmp_path).bytes_parsed == 0
    assert scalar(tmp_path, "SELECT count(DISTINCT step) FROM train") == 6


def test_torn_line_dropped_by_a_resumed_writer_leaves_each_step_once(tmp_path):
    run_dir = make_run(tmp_path, 1, 5, done=False)
    path = run_dir / "metrics.jsonl"
    with open(path, "a") as handle:
        handle.write(json.dumps(train_row(1, 5))[:15])
    ingest(tmp_path)
    with MetricsWriter(path) as writer:  # the resumed job drops the fragment and writes step 5 again
        for step in (5, 6):
            writer.write(train_row(1, step))
    report = ingest(tmp_path)
    assert not report.torn_files and not report.reset_files  # bytes before the offset are unchanged
    assert query("SELECT step FROM train ORDER BY step", tmp_path, ingest_first=False)["step"].to_list() == list(
        range(7)
    )


def test_malformed_config_and_done_are_reported_with_their_paths_and_others_ingest(tmp_path):
    bad_config = make_run(tmp_path, 0, 10) / "config.json"
    bad_done = make_run(tmp_path, 1, 10) / "done.json"
    make_run(tmp_path, 2, 10)
    bad_config.write_text('{"method": "ect", "preset": ')
    bad_done.write_text("[1, 2]")
    report = ingest(tmp_path)
    assert {problem.path for problem in report.errors} == {str(bad_config), str(bad_done)}
    assert scalar(tmp_path, "SELECT count(*) FROM train") == 30
    runs = query("SELECT run_id, method, status FROM runs ORDER BY run_id", tmp_path, ingest_first=False)
    assert runs.rows() == [("r00", None, "done"), ("r01", "ect", "done"), ("r02", "ect", "done")]
    # r01's done.json is unreadable, so its status falls back to status.json's state.

    result = CliRunner().invoke(results_group, ["ingest", "--root", str(tmp_path), "--strict"])
    assert result.exit_code == 1
    assert str(bad_config) in result.output and str(bad_done) in result.output  # re-reported while unchanged

    atomic_write_json(bad_config, config_of("r00", 0))
    assert {problem.path for problem in ingest(tmp_path).errors} == {str(bad_done)}
    assert scalar(tmp_path, "SELECT method FROM runs WHERE run_id = 'r00'") == "ect"
