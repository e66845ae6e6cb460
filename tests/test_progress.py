"""Watching runs (cmscale.progress): status.json progress fields at a bounded rate, a log line per
log_every, TensorBoard event files that hold the run's losses, and a clear error without the extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmscale.config import RunConfig
from cmscale.progress import Progress
from cmscale.rundir import read_json, read_metrics
from cmscale.train import train

REPO = Path(__file__).resolve().parents[1]
PROGRESS_FIELDS = {"step", "total_steps", "images_per_s", "loss", "eta_s", "updated"}


def test_status_holds_the_progress_fields_at_log_steps_and_at_most_once_per_interval_between(tmp_path, capsys):
    progress = Progress(tmp_path, total_steps=100, batch_size=8, log_every=10, start_step=0, interval_s=3600)
    progress.step(1, 2.5)  # the first report: written (no earlier write to wait for)
    first = read_json(tmp_path / "status.json")
    assert PROGRESS_FIELDS <= set(first) and first["state"] == "running"
    assert first["step"] == 1 and first["total_steps"] == 100 and first["loss"] == 2.5
    assert first["images_per_s"] > 0 and first["eta_s"] == pytest.approx(99 * 8 / first["images_per_s"])
    progress.step(2, 2.4)  # neither a log step nor an interval later: not written
    assert read_json(tmp_path / "status.json")["step"] == 1
    progress.step(10, 2.0)  # a log step: written, and one log line
    assert read_json(tmp_path / "status.json")["step"] == 10
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("step 10/100  loss 2") and "img/s" in lines[0]
    progress.close()


def test_tensorboard_event_files_hold_the_logged_losses(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = RunConfig(method="edm", preset="xxs", resolution=8, batch_size=4, budget_iters=9, log_every=3,
                       eval={"at_fractions": []}, tensorboard=True)
    train(config, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    expected = [(row["step"], row["loss"]) for row in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    assert [step for step, _ in logged] == [step for step, _ in expected] == [3, 6, 9]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line_naming_the_field_and_the_fix(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nfrom importlib.machinery import PathFinder\n\n\nclass Hide(PathFinder):\n"
        "    @classmethod\n    def find_spec(cls, name, path=None, target=None):\n"
        "        return None if name.partition('.')[0] == 'tensorboard' else PathFinder.find_spec(name, path, target)\n"
        "\n\nsys.meta_path[:] = [Hide if finder is PathFinder else finder for finder in sys.meta_path]\n")
    toml = tmp_path / "run.toml"
    toml.write_text('method = "edm"\npreset = "xxs"\nresolution = 8\nbudget_iters = 2\ntensorboard = true\n')
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "cmscale.cli", "train", str(toml), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{toml}: tensorboard = true needs the tensorboard package" in result.stderr
    assert "pip install 'cmscale[tensorboard]'" in result.stderr
    assert not (tmp_path / "run").exists()
