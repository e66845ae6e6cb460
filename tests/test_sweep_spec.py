"""Sweep specs (cmscale.sweep.spec, plan): a spec cannot move its runs to another sweep, a sweep name
names one spec, a grid too large to plan is refused before anything is built, a missing teacher
checkpoint fails planning, and names, seeds and files the store or the file system cannot hold
are refused at the edge, each in one message naming the file and the field."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from cmscale.cli.main import main
from cmscale.sweep.plan import plan_sweep, read_sweep_file
from cmscale.sweep.spec import MAX_PLANNED_RUNS, SpecError, load_spec, parse_spec

BASE = {"name": "s", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e10], "methods": {"edm": {}},
        "defaults": {"eval": {"at_fractions": []}}}


def one_flop(config) -> int:
    return 1


def write_spec(folder: Path, raw: dict, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(tomli_w.dumps(raw))
    return path


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("section", ["defaults", "methods.edm", "teacher.overrides"])
@pytest.mark.parametrize("field", ["sweep", "run_id", "seed", "method", "preset", "budget_iters", "dataset"])
def test_a_spec_cannot_override_a_runs_identity(section, field):
    raw = json.loads(json.dumps(BASE))
    table = raw
    for part in section.split("."):
        table = table.setdefault(part, {})
    table[field] = "other" if field in ("sweep", "run_id", "method", "preset", "dataset") else 3
    with pytest.raises(SpecError, match=rf"{section}\.{field}: set by the sweep spec itself"):
        parse_spec(raw, "spec.toml")


def test_defaults_sweep_no_longer_lands_runs_under_another_sweep(tmp_path):
    spec = write_spec(tmp_path, BASE | {"defaults": {"sweep": "other"}})
    result = cli("sweep", "launch", str(spec), "--root", str(tmp_path / "root"), "--dry-run")
    assert result.exit_code == 1 and "defaults.sweep" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "root" / "other").exists()


def test_a_grid_above_the_limit_is_refused_fast_and_small():
    raw = BASE | {"presets": ["xxs", "xs"], "methods": {"edm": {}, "sct": {}},
                  "budgets": {"start": 1e10, "stop": 1e12, "num": 1000}, "budgets_flops": [],
                  "seeds": list(range(100))}
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(SpecError, match=r"400,000 runs .* above the limit of 100,000"):
        plan_sweep(parse_spec(raw, "big.toml"), Path("/nonexistent"), source="big.toml", flops_fn=one_flop)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.monotonic() - started < 5 and peak < 50e6
    with pytest.raises(SpecError, match="budgets.num"):
        parse_spec(BASE | {"budgets": {"start": 1, "stop": 2, "num": MAX_PLANNED_RUNS + 1}}, "big.toml")


def test_a_missing_teacher_checkpoint_fails_plan_and_dry_run(tmp_path):
    raw = BASE | {"methods": {"ect": {}}, "teacher": {"checkpoints": {"xxs": str(tmp_path / "missing.pt")}}}
    spec = write_spec(tmp_path, raw)
    for command in (["sweep", "plan"], ["sweep", "launch", "--dry-run"]):
        result = cli(*command, str(spec), "--root", str(tmp_path / "root"))
        assert result.exit_code == 1, result.output
        assert "teacher.checkpoints" in result.output and "xxs = " in result.output and "missing.pt" in result.output
        assert "Traceback" not in result.output
    (tmp_path / "missing.pt").touch()
    assert cli("sweep", "plan", str(spec), "--root", str(tmp_path / "root")).exit_code == 0


@pytest.mark.parametrize("name", ["abc\n", "abc\r", "a/b", ".hidden", "x" * 129])
def test_a_sweep_name_that_is_not_one_plain_folder_name_is_refused(name):
    with pytest.raises(SpecError, match="name"):
        parse_spec(BASE | {"name": name}, "spec.toml")


@pytest.mark.parametrize("seeds", [[2**64], [2**31], [-1]])
def test_a_seed_the_store_cannot_hold_is_refused_when_planning(tmp_path, seeds):
    spec = write_spec(tmp_path, BASE | {"seeds": seeds})
    result = cli("sweep", "plan", str(spec), "--root", str(tmp_path))
    assert result.exit_code == 1 and "seeds.0" in result.output and "Traceback" not in result.output
    assert str(spec) in result.output


def test_a_non_utf8_spec_names_the_file_and_the_byte(tmp_path):
    spec = tmp_path / "latin1.toml"
    spec.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(SpecError, match=r"latin1.toml: not UTF-8 text \(byte 11"):
        load_spec(spec)
    result = cli("sweep", "plan", str(spec))
    assert result.exit_code == 1 and "not UTF-8" in result.output and "Traceback" not in result.output


def test_a_sweep_name_reused_by_another_spec_is_refused_naming_both(tmp_path):
    root = tmp_path / "root"
    first = write_spec(tmp_path, BASE | {"executor": {"name": "debug"}}, "first.toml")
    plan = plan_sweep(load_spec(first), root, source=str(first))
    from cmscale.sweep.plan import write_sweep_file

    write_sweep_file(root, "s", plan, spec_path=str(first.resolve()), spec=load_spec(first))
    second = write_spec(tmp_path, BASE | {"budgets_flops": [1e10, 2e10]}, "second.toml")
    for extra in ([], ["--dry-run"]):
        result = cli("sweep", "launch", str(second), "--root", str(root), *extra)
        assert result.exit_code == 1, result.output
        assert "first.toml" in result.output and "second.toml" in result.output and "--new-version" in result.output
    assert [r["run_id"] for r in read_sweep_file(root, "s")["runs"]] == [run.run_id for run in plan]
    # The same spec again (a relaunch, another executor) is the same sweep.
    write_sweep_file(root, "s", plan, spec_path=str(first.resolve()), spec=load_spec(first), executor="local")
    # --new-version adds the new spec's runs and keeps the earlier ones, so status lists every run.
    result = cli("sweep", "launch", str(second), "--root", str(root), "--new-version", "--dry-run")
    assert result.exit_code == 0, result.output
    second_plan = plan_sweep(load_spec(second), root, source=str(second))
    write_sweep_file(root, "s", second_plan, spec_path=str(second), spec=load_spec(second), new_version=True)
    stored = read_sweep_file(root, "s")
    assert {r["run_id"] for r in stored["runs"]} == {run.run_id for run in plan + second_plan}
    assert len(stored["versions"]) == 2
    # Both versions now name the sweep: relaunching the first spec is accepted.
    write_sweep_file(root, "s", plan, spec_path=str(first), spec=load_spec(first))
