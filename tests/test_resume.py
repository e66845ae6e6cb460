"""Resuming a run (cmscale.resume, Trainer.resume): bad checkpoints set aside, mismatched teachers, changed
configs on resume (refused, or forced and recorded), and re-running a failed run's folder. Real tiny runs on
the CPU (xxs, 16x16 digits, batch 4, a few steps)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomli_w
import torch
from click.testing import CliRunner

from cmscale.cli import main
from cmscale.config import RunConfig
from cmscale.methods import TeacherCheckpointError, build_method
from cmscale.resume import ResumeConfigError, resume_differences
from cmscale.rundir import read_json, read_metrics
from cmscale.train import train

NO_EVAL = {"at_fractions": []}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("CMSCALE_NUM_THREADS", "1")


def tiny(**changes) -> RunConfig:
    fields = {"method": "edm", "preset": "xxs", "batch_size": 4, "budget_iters": 6, "ckpt_every": 2, "log_every": 1,
              "eval": NO_EVAL}
    return RunConfig(**(fields | changes))


def as_killed(run_dir: Path) -> None:
    """Make a finished run look like one killed after its last checkpoint (done.json and final.pt gone)."""
    (run_dir / "done.json").unlink()
    (run_dir / "ckpt" / "final.pt").unlink()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "ckpt" / "final.pt", weights_only=True)["net"]


# -- item 4: a corrupt or empty checkpoint ---------------------------------------------------------------------


def test_saving_keeps_the_previous_good_checkpoint_with_its_metadata(tmp_path):
    assert train(tiny(), tmp_path / "run")["status"] == "done"
    latest = torch.load(tmp_path / "run" / "ckpt" / "latest.pt", weights_only=True)
    previous = torch.load(tmp_path / "run" / "ckpt" / "previous.pt", weights_only=True)
    assert (latest["step"], previous["step"]) == (6, 4)
    for state in (latest, previous):
        assert {key: state[key] for key in ("preset", "resolution", "img_channels", "sigma_data", "method")} == {
            "preset": "xxs", "resolution": 16, "img_channels": 1, "sigma_data": 0.5, "method": "edm"}


def test_an_empty_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(tmp_path):
    reference = tmp_path / "reference"
    assert train(tiny(), reference)["status"] == "done"
    run_dir = tmp_path / "run"
    train(tiny(), run_dir)
    as_killed(run_dir)
    (run_dir / "ckpt" / "latest.pt").write_bytes(b"")  # a checkpoint cut short at 0 bytes
    done = train(tiny(), run_dir)
    assert done["status"] == "done" and done["final_step"] == 6
    aside = list((run_dir / "ckpt").glob("latest.pt.bad-*"))
    assert len(aside) == 1 and aside[0].stat().st_size == 0
    [note] = done["resume_notes"]
    assert note.startswith(str(run_dir / "ckpt" / "latest.pt")) and f"moved to {aside[0].name}" in note
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl", "train")] == [1, 2, 3, 4, 5, 6]
    # Resumed from step 4, the run replays the uninterrupted one exactly.
    for key, value in final_weights(reference).items():
        torch.testing.assert_close(final_weights(run_dir)[key], value, rtol=0, atol=0)


def test_with_no_good_checkpoint_left_the_run_ends_failed_naming_the_files(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny(), run_dir)
    as_killed(run_dir)
    (run_dir / "ckpt" / "latest.pt").write_bytes(b"\x00garbage")
    (run_dir / "ckpt" / "previous.pt").write_bytes(b"")
    done = train(tiny(), run_dir)
    assert done["status"] == "failed"
    for name in ("latest.pt", "previous.pt", "to start the run fresh"):
        assert name in done["reason"]
    assert read_json(run_dir / "done.json")["reason"] == done["reason"]
    assert read_json(run_dir / "status.json")["state"] == "failed"
    assert len(list((run_dir / "ckpt").glob("*.bad-*"))) == 2


# -- item 5: a mismatched teacher ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_8px(tmp_path_factory) -> Path:
    """An EDM teacher trained at 8x8: its convolutions have the same shapes as at 16x16."""
    run_dir = tmp_path_factory.mktemp("teacher") / "edm8"
    assert train(tiny(resolution=8, budget_iters=1), run_dir)["status"] == "done"
    return run_dir / "ckpt" / "final.pt"


def test_a_teacher_of_another_resolution_or_preset_is_refused_naming_both_values(teacher_8px):
    ect = RunConfig(method="ect", preset="xxs", budget_iters=2, teacher_ckpt=str(teacher_8px), eval=NO_EVAL)
    with pytest.raises(TeacherCheckpointError, match="resolution: the checkpoint has 8, the run has 16"):
        build_method(ect, img_channels=1)
    with pytest.raises(TeacherCheckpointError, match="preset: the checkpoint has 'xxs', the run has 'xs'"):
        build_method(ect.model_copy(update={"preset": "xs", "resolution": 8}), img_channels=1)
    with pytest.raises(TeacherCheckpointError, match="img_channels: the checkpoint has 1, the run has 3"):
        build_method(ect.model_copy(update={"resolution": 8}), img_channels=3)
    with pytest.raises(TeacherCheckpointError, match="sigma_data: the checkpoint has 0.5, the run has 1.0"):
        build_method(RunConfig(method="scd", preset="xxs", resolution=8, budget_iters=2, teacher_ckpt=str(teacher_8px),
                               scm={"sigma_data": 1.0}), img_channels=1)


def test_a_bare_state_dict_of_another_preset_is_a_clear_error(tmp_path):
    net = build_method(RunConfig(method="edm", preset="xs", budget_iters=1), img_channels=1).model.net
    torch.save({"net": net.state_dict()}, tmp_path / "xs.pt")
    config = RunConfig(method="ect", preset="xxs", budget_iters=1, teacher_ckpt=str(tmp_path / "xs.pt"))
    with pytest.raises(TeacherCheckpointError, match=r"does not fit this run's network \(Error\(s\) in loading"):
        build_method(config, img_channels=1)


def test_train_cli_names_the_teacher_mismatch(tmp_path, teacher_8px):
    toml = tmp_path / "ect.toml"
    toml.write_text(tomli_w.dumps({"method": "ect", "preset": "xxs", "budget_iters": 2,
                                   "teacher_ckpt": str(teacher_8px), "eval": NO_EVAL}))
    result = CliRunner().invoke(main, ["train", str(toml), "--root", str(tmp_path / "root")])
    assert result.exit_code == 1 and "teacher_ckpt" in result.output
    assert "the checkpoint has 8, the run has 16" in result.output
    assert not (tmp_path / "root").exists()


# -- item 6: a changed config on resume ------------------------------------------------------------------------


def test_resume_refuses_changes_that_alter_the_result_and_names_them(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny(), run_dir)
    as_killed(run_dir)
    with pytest.raises(ResumeConfigError) as caught:
        train(tiny(budget_iters=3, lr=5e-4), run_dir)
    message = str(caught.value)
    assert "budget_iters: 6 -> 3" in message and "lr: 0.001 -> 0.0005" in message and "--force" in message
    with pytest.raises(ResumeConfigError, match=r"edm.P_mean: -1.2 -> 0.0"):
        train(tiny(edm={"P_mean": 0.0}), run_dir)
    assert not (run_dir / "done.json").exists()
    # Intervals and the heartbeat cannot change the result: a resume may change them.
    assert train(tiny(log_every=3, ckpt_every=5, heartbeat_s=1.0), run_dir)["status"] == "done"


def test_force_resumes_with_the_new_settings_and_records_them(tmp_path):
    toml = tmp_path / "run.toml"
    fields = {"method": "edm", "preset": "xxs", "batch_size": 4, "budget_iters": 6, "ckpt_every": 2, "eval": NO_EVAL}
    toml.write_text(tomli_w.dumps(fields))
    root = tmp_path / "root"
    assert CliRunner().invoke(main, ["train", str(toml), "--root", str(root)]).exit_code == 0
    run_dir = root / "adhoc" / "run"
    as_killed(run_dir)
    refused = CliRunner().invoke(main, ["train", str(toml), "--root", str(root), "--set", "budget_iters=8"])
    assert refused.exit_code == 1 and "budget_iters: 6 -> 8" in refused.output
    forced = CliRunner().invoke(main, ["train", str(toml), "--root", str(root), "--set", "budget_iters=8", "--force"])
    assert forced.exit_code == 0, forced.output
    assert read_json(run_dir / "done.json")["final_step"] == 8
    config = read_json(run_dir / "config.json")
    assert config["budget_iters"] == 8
    assert config["forced_changes"] == [{"at_step": 6, "changes": ["budget_iters: 6 -> 8"]}]


# -- item 7: re-running a failed run's folder ------------------------------------------------------------------


def test_rerunning_a_failed_runs_folder_says_it_is_finished_and_how_to_start_fresh(tmp_path):
    teacher = build_method(RunConfig(method="edm", preset="xxs", budget_iters=1), img_channels=1).model.net
    state = {key: torch.full_like(value, math.nan) if value.is_floating_point() else value
             for key, value in teacher.state_dict().items()}
    torch.save({"net": state}, tmp_path / "nan_teacher.pt")
    toml = tmp_path / "ect.toml"
    toml.write_text(tomli_w.dumps({"method": "ect", "preset": "xxs", "batch_size": 4, "budget_iters": 3,
                                   "teacher_ckpt": str(tmp_path / "nan_teacher.pt"), "eval": NO_EVAL}))
    root = tmp_path / "root"
    first = CliRunner().invoke(main, ["train", str(toml), "--root", str(root)])
    assert first.exit_code == 1 and "non-finite loss" in first.output
    again = CliRunner().invoke(main, ["train", str(toml), "--root", str(root)])
    run_dir = root / "adhoc" / "ect"
    assert again.exit_code == 1
    assert f"{run_dir} holds a finished run (status failed" in again.output
    assert f"rm -r {run_dir}" in again.output and "nothing was run" in again.output


def test_a_planned_teacher_under_a_moved_root_may_change_its_path_but_a_given_teacher_may_not():
    old, new = "/old/root/s/t/ckpt/final.pt", "/new/root/s/t/ckpt/final.pt"
    planned = RunConfig(method="ect", preset="xxs", budget_iters=2, teacher_ckpt=new, teacher_run_id="t")
    assert resume_differences(planned, planned.model_dump(mode="json") | {"teacher_ckpt": old}) == []
    given = planned.model_copy(update={"teacher_run_id": None})
    assert resume_differences(given, given.model_dump(mode="json") | {"teacher_ckpt": old}) == [
        f"teacher_ckpt: {old!r} -> {new!r}"]
