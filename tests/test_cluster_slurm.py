"""The SLURM layer (cmscale.cluster.slurm) against fake ``sbatch``/``squeue``/``sacct``/``scancel``/``scontrol``
on PATH (as submitit tests itself): fast, beside the real-cluster tests (test_slurm_*.py), which stay; and
array job ids as squeue and sacct print them.

Each fake logs its command line (one JSON list per call) and answers from files the test writes:
squeue prints ``queue.txt`` whatever it is asked (a queue shared with other users), sacct prints
``sacct.txt``, sbatch keeps the script it was given and answers with the next job id.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmscale.cli import main
from cmscale.cluster import slurm
from cmscale.cluster.slurm import expand_job_ids
from cmscale.rundir import DONE_FILE, atomic_write_json
from cmscale.sweep.launch import poll_intervals, wait_for_sweep
from cmscale.sweep.plan import read_sweep_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep_digits_tiny.toml"

FAKE = r'''#!PYTHON
import json, os, sys
from pathlib import Path
here = Path(os.environ["FAKE_SLURM_DIR"])
name = Path(sys.argv[0]).name
with open(here / "calls.jsonl", "a") as log:
    log.write(json.dumps([name, *sys.argv[1:]]) + "\n")
if name == "sbatch":
    counter = here / "next_id"
    job = int(counter.read_text()) if counter.exists() else 1
    counter.write_text(str(job + 1))
    (here / "scripts").mkdir(exist_ok=True)
    (here / "scripts" / f"{job}.sh").write_text(Path(sys.argv[-1]).read_text())
    print(f"Submitted batch job {job}")
elif name in ("squeue", "sacct"):
    answer = here / ("queue.txt" if name == "squeue" else "sacct.txt")
    if (here / f"{name}.fails").exists():
        sys.exit(1)
    print(answer.read_text() if answer.exists() else "", end="")
elif name == "scontrol":
    print("MaxArraySize            = 1001")
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """The folder of the fake executables (put first on PATH); ``calls(name)`` lists their argv."""
    here = tmp_path / "fake_slurm"
    here.mkdir()
    for name in ("sbatch", "squeue", "sacct", "scancel", "scontrol"):
        path = here / name
        path.write_text(FAKE.replace("PYTHON", sys.executable))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{here}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(here))

    class Fake:
        folder = here

        @staticmethod
        def calls(name: str) -> list[list[str]]:
            log = here / "calls.jsonl"
            lines = log.read_text().splitlines() if log.exists() else []
            return [call[1:] for call in map(json.loads, lines) if call[0] == name]

        @staticmethod
        def queue(text: str) -> None:
            (here / "queue.txt").write_text(text)

        @staticmethod
        def accounting(text: str) -> None:
            (here / "sacct.txt").write_text(text)

    assert shutil.which("squeue") == str(here / "squeue")  # the fake answers, not a cluster
    return Fake


def _ids_asked(call: list[str]) -> list[str]:
    return call[call.index("-j") + 1].split(",")


def test_states_are_asked_for_the_sweeps_own_jobs_and_others_never_reported(fake_slurm):
    # the queue holds another user's jobs (99, 100_3) beside ours (12's tasks, 15)
    fake_slurm.queue("99 RUNNING\n12_0 RUNNING\n12_[1-2] PENDING\n100_3 RUNNING\n15 PENDING\n")
    states = slurm.slurm_job_states(["12_0", "12_1", "12_2", "15"])
    assert states == {"12_0": "RUNNING", "12_1": "PENDING", "12_2": "PENDING", "15": "PENDING"}
    (squeue,) = fake_slurm.calls("squeue")
    assert _ids_asked(squeue) == ["12", "15"]  # one id per array, every call names its jobs
    assert fake_slurm.calls("sacct") == []  # squeue knew them all


def test_many_jobs_are_asked_in_batches(fake_slurm, monkeypatch):
    monkeypatch.setattr(slurm, "QUERY_BATCH", 2)
    fake_slurm.queue("")
    slurm.slurm_job_states(["1", "2_0", "3", "10", "11_4"])
    assert [_ids_asked(call) for call in fake_slurm.calls("squeue")] == [["1", "2"], ["3", "10"], ["11"]]
    # none was known to squeue: sacct is asked about the same ids, batched the same way
    assert [_ids_asked(call) for call in fake_slurm.calls("sacct")] == [["1", "2"], ["3", "10"], ["11"]]


def test_sacct_is_asked_only_about_completing_or_unknown_jobs(fake_slurm):
    fake_slurm.queue("20 RUNNING\n21 COMPLETING\n")
    fake_slurm.accounting("21|CANCELLED by 0\n22|COMPLETED\n99|FAILED\n")
    states = slurm.slurm_job_states(["20", "21", "22"])
    assert states == {"20": "RUNNING", "21": "CANCELLED+COMPLETING", "22": "COMPLETED"}
    (sacct,) = fake_slurm.calls("sacct")
    assert _ids_asked(sacct) == ["21", "22"]


def test_a_failing_squeue_leaves_sacct_to_answer_and_no_answer_is_empty(fake_slurm):
    (fake_slurm.folder / "squeue.fails").touch()
    fake_slurm.accounting("30|PENDING\n")
    assert slurm.slurm_job_states(["30"]) == {"30": "PENDING"}
    (fake_slurm.folder / "sacct.fails").touch()
    assert slurm.slurm_job_states(["30"]) == {}
    assert slurm.slurm_job_states([]) == {}


def test_poll_intervals_back_off_to_the_cap():
    intervals = poll_intervals(2.0, max_s=10.0)
    assert [next(intervals) for _ in range(6)] == [2.0, 3.0, 4.5, 6.75, 10.0, 10.0]


@pytest.fixture
def launched(fake_slurm, tmp_path):
    """The tiny sweep launched on the fake SLURM with --set seeds=[0,1] (nothing runs)."""
    root = tmp_path / "results"
    result = CliRunner().invoke(main, ["sweep", "launch", str(EXAMPLE), "--root", str(root), "--executor", "slurm",
                                       "--profile", "local", "--set", "seeds=[0,1]", "--json"])
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout)


def test_launch_submits_arrays_and_the_overridden_spec_lands_in_sweep_json(launched, fake_slurm):
    root, payload = launched
    assert len(payload["submitted"]) == 20  # 10 runs per seed
    stored = read_sweep_file(root, "digits_tiny")
    assert stored["overrides"] == {"seeds": [0, 1]}
    assert stored["spec"]["seeds"] == [0, 1]
    assert {run["config"]["seed"] for run in stored["runs"]} == {0, 1}
    teachers, *students = [calls[-1] for calls in fake_slurm.calls("sbatch")]
    scripts = sorted((fake_slurm.folder / "scripts").iterdir(), key=lambda path: int(path.stem))
    assert "#SBATCH --array=0-3%2" in scripts[0].read_text()  # 4 teachers: 2 presets x 2 seeds
    assert all("#SBATCH --dependency=afterok:1_" in script.read_text() for script in scripts[1:])
    assert payload["arrays"][0]["array_job_id"] == "1"


def test_status_cancel_and_wait_ask_only_about_the_sweeps_jobs(launched, fake_slurm):
    root, payload = launched
    arrays = [array["array_job_id"] for array in payload["arrays"]]
    fake_slurm.queue("777 RUNNING\n" + "".join(f"{job}_[0-9] PENDING\n" for job in arrays))
    status = CliRunner().invoke(main, ["sweep", "status", "digits_tiny", "--root", str(root), "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["counts"] == {"queued": 20}
    for call in fake_slurm.calls("squeue"):
        assert sorted(_ids_asked(call)) == sorted(arrays)
    cancel = CliRunner().invoke(main, ["sweep", "cancel", "digits_tiny", "--root", str(root), "--json"])
    assert cancel.exit_code == 0, cancel.output
    cancelled = json.loads(cancel.stdout)["cancelled"]
    (scancel,) = fake_slurm.calls("scancel")
    assert sorted(scancel) == sorted(cancelled) and "777" not in scancel and len(cancelled) == 20

    # --wait's polling: the interval grows while nothing changes and starts over after a change
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:  # one task starts running: a change
            fake_slurm.queue("".join(f"{job}_[0-9] PENDING\n" for job in arrays) + f"{arrays[0]}_0 RUNNING\n")
        if len(slept) == 6:  # every run ends
            for run in read_sweep_file(root, "digits_tiny")["runs"]:
                atomic_write_json(root / "digits_tiny" / run["run_id"] / DONE_FILE, {"status": "done"})

    states = wait_for_sweep(root, "digits_tiny", poll_s=1.0, max_poll_s=2.0, sleep=sleep)
    assert {state.state for state in states} == {"done"}
    assert slept == [1.0, 1.5, 2.0, 1.0, 1.5, 2.0]


def test_dry_run_skips_done_runs_and_writes_the_sbatch_scripts_it_would_submit(fake_slurm, tmp_path):
    root = tmp_path / "results"
    planned = CliRunner().invoke(main, ["sweep", "plan", str(EXAMPLE), "--root", str(root), "--json"])
    runs = json.loads(planned.stdout)
    done = [run["run_id"] for run in runs if run["method"] in ("edm", "ect")]
    for run_id in done:
        atomic_write_json(root / "digits_tiny" / run_id / DONE_FILE, {"status": "done"})
    scripts = tmp_path / "scripts"
    result = CliRunner().invoke(main, ["sweep", "launch", str(EXAMPLE), "--root", str(root), "--executor", "slurm",
                                       "--profile", "local", "--dry-run", "--scripts-dir", str(scripts), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert sorted(payload["skipped"]) == sorted(done) and set(payload["skipped"].values()) == {"done"}
    assert sorted(payload["submitted"]) == sorted(run["run_id"] for run in runs if run["method"] == "scd")
    written = sorted(scripts.iterdir())
    assert [str(path) for path in written] == sorted(payload["scripts"])
    text = written[0].read_text()
    assert "#SBATCH --array=0-3%2" in text and "--dependency" not in text  # teachers done: no dependency
    assert all(run_id in text for run_id in payload["submitted"])
    assert fake_slurm.calls("sbatch") == []  # nothing submitted
    assert not (root / "digits_tiny" / "sweep.json").exists()


@pytest.mark.parametrize(("printed", "expected"), [
    ("123", ["123"]),                                  # a plain job
    ("7_12", ["7_12"]),                                # one running array task
    ("5_[2]", ["5_2"]),                                # one pending task in brackets
    ("5_[0-3]", ["5_0", "5_1", "5_2", "5_3"]),         # a pending range
    ("5_[0-3,7%2]", ["5_0", "5_1", "5_2", "5_3", "5_7"]),  # ranges, single tasks and a throttle
    ("9_[1,4-5]", ["9_1", "9_4", "9_5"]),
    ("5_[a-b]", []),                                   # not task numbers: nothing to track
])
def test_expand_job_ids_lists_every_task_of_a_pending_array(printed, expected):
    assert expand_job_ids(printed) == expected
