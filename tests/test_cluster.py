"""The scheduler's answers, parsed: job ids of arrays as squeue and sacct print them."""

from __future__ import annotations

import pytest

from cmscale.cluster.executors import make_executor
from cmscale.cluster.slurm import expand_job_ids


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


def test_make_executor_refuses_slurm_without_a_profile_and_unknown_kinds(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        make_executor("slurm", tmp_path, name="x")
    with pytest.raises(ValueError, match="local, slurm, debug"):
        make_executor("kubernetes", tmp_path, name="x")
