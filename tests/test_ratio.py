"""The teacher-student ratio (cmscale.analysis.ratio): the slope's CI against known ratios."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cmscale.analysis.ratio import ratio_regression, ratio_table


def _ratio_data(slope: float, seed: int, sizes=np.logspace(7, 9, 5), seeds: int = 2, noise: float = 0.02):
    rng = np.random.default_rng(seed)
    params = np.repeat(sizes, seeds)
    teacher = 5.0 * (params / 1e7) ** -0.1 * np.exp(rng.normal(0, noise, params.size))
    ratio = 1.09 * (params / 1e7) ** slope * np.exp(rng.normal(0, noise, params.size))
    return params, teacher, teacher * ratio


def test_constant_ratio_gives_slope_ci_holding_zero():
    results = [ratio_regression(*_ratio_data(0.0, seed)) for seed in range(40)]
    first = results[0]
    assert first["slope_ci"][0] < 0 < first["slope_ci"][1]
    assert first["ci"][0] < 1.09 < first["ci"][1]
    holds_zero = np.mean([r["slope_ci"][0] < 0 < r["slope_ci"][1] for r in results])
    assert 0.85 <= holds_zero  # nominal 95%
    assert first["gap"] == pytest.approx(np.mean(_ratio_data(0.0, 0)[2] - _ratio_data(0.0, 0)[1]))


def test_ratio_growing_with_size_rejects_zero_slope():
    results = [ratio_regression(*_ratio_data(0.2, seed)) for seed in range(40)]
    assert all(r["slope_p"] < 0.05 and r["slope_ci"][0] > 0 for r in results)
    slopes = np.array([r["slope"] for r in results])
    assert abs(slopes.mean() - 0.2) < 0.01
    assert "with_teacher_fid" in results[0]


def test_ratio_table_groups_pairs():
    params, teacher, student = _ratio_data(0.0, 1)
    pairs = pd.concat(
        [
            pd.DataFrame({"group": "scd 2-step", "params": params, "teacher_fid": teacher, "student_fid": student}),
            pd.DataFrame(
                {"group": "scd 1-step", "params": params, "teacher_fid": teacher, "student_fid": 1.3 * student}
            ),
        ]
    )
    table = ratio_table(pairs)
    assert table["scd 1-step"]["mean_ratio"] == pytest.approx(1.3 * table["scd 2-step"]["mean_ratio"])
    assert table["scd 1-step"]["slope"] == pytest.approx(table["scd 2-step"]["slope"])
