"""Checkpoints (cmscale.checkpoint): one CheckpointIO saves and loads every named part, keeps the previous good
file, falls back to it past a torn latest one (set aside, named), and refuses a checkpoint of another run.
A full disk at a checkpoint ends the run with one line and no temporary file; the run resumes once space is
back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cmscale.checkpoint import CheckpointError, CheckpointIO
from cmscale.cli.main import main
from cmscale.models.ema import EMA
from cmscale.rundir import atomic_write_bytes, latest_checkpoint, previous_checkpoint, read_json

META = {"preset": "xxs", "method": "edm"}


def parts(seed: int) -> CheckpointIO:
    torch.manual_seed(seed)
    model, extra = nn.Linear(4, 3), nn.Linear(2, 1)
    optimizer = torch.optim.Adam([*model.parameters(), *extra.parameters()], lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # an optimiser with state (moments), not just hyperparameters
    return CheckpointIO(META, model=model, extra=[extra], emas=EMA(model, rates=[0.9]), optimizer=optimizer)


def tensors(state) -> list:
    """Every tensor and number in a (nested) state, in order, for exact comparison."""
    if isinstance(state, dict):
        return [item for key in sorted(state, key=str) for item in tensors(state[key])]
    if isinstance(state, list | tuple):
        return [item for value in state for item in tensors(value)]
    return [state]


def same(left, right) -> bool:
    pairs = list(zip(tensors(left), tensors(right), strict=True))
    return all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in pairs)


def test_every_part_round_trips_and_the_plain_values_come_back(tmp_path):
    saved = parts(0)
    saved.save(latest_checkpoint(tmp_path), step=7, wall_s=1.5)
    loaded = parts(1)
    path, values, notes = loaded.load_newest(tmp_path, move_bad=True)
    assert path == latest_checkpoint(tmp_path) and values == {"step": 7, "wall_s": 1.5} and notes == []
    for name in ("model", "extra", "emas", "optimizer"):
        assert same(loaded.state_dict()[name], saved.state_dict()[name]), name
    assert not same(parts(1).state_dict()["model"], saved.state_dict()["model"])  # the check can fail
    on_disk = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert {key: on_disk[key] for key in META} == META  # the metadata travels in the file


def test_a_torn_latest_is_set_aside_and_the_previous_good_one_loads(tmp_path):
    first = parts(0)
    first.save(latest_checkpoint(tmp_path), previous=previous_checkpoint(tmp_path), step=1)
    parts(2).save(latest_checkpoint(tmp_path), previous=previous_checkpoint(tmp_path), step=2)
    assert torch.load(previous_checkpoint(tmp_path), weights_only=True)["step"] == 1  # kept on the new save
    latest_checkpoint(tmp_path).write_bytes(latest_checkpoint(tmp_path).read_bytes()[:100])
    loaded = parts(3)
    path, values, notes = loaded.load_newest(tmp_path, move_bad=True)
    assert path == previous_checkpoint(tmp_path) and values["step"] == 1
    assert len(notes) == 1 and str(latest_checkpoint(tmp_path)) in notes[0] and "moved to latest.pt.bad-" in notes[0]
    assert not latest_checkpoint(tmp_path).exists()
    assert same(loaded.state_dict()["model"], first.state_dict()["model"])


def test_a_checkpoint_of_another_run_is_refused_naming_the_field(tmp_path):
    parts(0).save(latest_checkpoint(tmp_path), step=1)
    other = parts(1)
    other.meta = {"preset": "xs", "method": "edm"}
    with pytest.raises(CheckpointError, match=r"preset: the checkpoint has 'xxs', the run has 'xs'"):
        other.load_newest(tmp_path, move_bad=False)
    assert latest_checkpoint(tmp_path).exists()  # not moved when this process is not the writer
    assert parts(2).load_newest(tmp_path / "empty", move_bad=True) == (None, None, [])


RUN = ('method = "edm"\npreset = "xxs"\nbudget_iters = 4\nbatch_size = 8\nckpt_every = 2\nlog_every = 1\n'
       '[eval]\nat_fractions = []\n')


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_temp_file(tmp_path, small_disk):
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(RUN)
    run_dir = small_disk / "run"
    result = CliRunner().invoke(main, ["train", str(run_toml), "--out", str(run_dir)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "cannot write the checkpoint" in result.output and "latest.pt" in result.output
    assert "Free space" in result.output
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert read_json(run_dir / "status.json")["state"] == "failed"


def test_an_atomic_write_that_fails_leaves_no_temp_file(small_disk):
    with pytest.raises(OSError):
        atomic_write_bytes(small_disk / "big.json", b"x" * (1 << 20))
    assert list(Path(small_disk).iterdir()) == []


def test_the_run_resumes_once_space_is_back(tmp_path, small_disk):
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(RUN)
    run_dir = small_disk / "run"
    assert CliRunner().invoke(main, ["train", str(run_toml), "--out", str(run_dir)]).exit_code == 1
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    result = CliRunner().invoke(main, ["train", str(run_toml), "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert read_json(run_dir / "done.json")["status"] == "done"
