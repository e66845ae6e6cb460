"""Executors (cmscale.cluster.executors): the kinds it makes and what it refuses."""

from __future__ import annotations

import pytest

from cmscale.cluster.executors import make_executor


def test_make_executor_refuses_slurm_without_a_profile_and_unknown_kinds(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        make_executor("slurm", tmp_path, name="x")
    with pytest.raises(ValueError, match="local, slurm, debug"):
        make_executor("kubernetes", tmp_path, name="x")
