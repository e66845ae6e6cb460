"""Checkpoint writes on a full disk (cmscale.checkpoint, rundir): a full disk at a checkpoint ends the run with one
line naming the file and the fix, no temporary file left behind, the run's status no longer
'running', and the run resumable once space is back. A real tmpfs of a few hundred KiB."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmscale.cli.main import main
from cmscale.rundir import atomic_write_bytes, read_json

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
