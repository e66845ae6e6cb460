"""Metric names, SQL quoting and the teacher test (cmscale.analysis.data)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

import cmscale.analysis
from cmscale.analysis.data import is_teacher, parse_metric, sql_literal, sweep_methods


def test_metric_names_and_sql_quoting():
    assert parse_metric("fid_2step").sampler_steps == 2
    with pytest.raises(ValueError, match="fid_<k>step"):
        parse_metric("fid2")
    assert sql_literal("it's") == "'it''s'"


def test_teachers_are_told_apart_by_one_predicate_on_names_and_columns():
    assert is_teacher("edm") and not is_teacher("ect")
    column = pd.Series(["ect", "edm", "scd"])
    assert is_teacher(column).tolist() == [False, True, False]
    assert sweep_methods(pd.DataFrame({"method": ["edm", "sct", "ect", "edm"]})) == ["ect", "sct", "edm"]
    # no module of the analysis compares a method name itself (issue 25: no `method ==` outside the recipes)
    package = Path(cmscale.analysis.__file__).parent
    found = [f"{path.name}:{number}" for path in sorted(package.glob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\bmethod\s*[!=]=", line)]
    assert found == []
