"""Metric names and SQL quoting (cmscale.analysis.data)."""

from __future__ import annotations

import pytest

from cmscale.analysis.data import parse_metric, sql_literal


def test_metric_names_and_sql_quoting():
    assert parse_metric("fid_2step").sampler_steps == 2
    with pytest.raises(ValueError, match="fid_<k>step"):
        parse_metric("fid2")
    assert sql_literal("it's") == "'it''s'"
