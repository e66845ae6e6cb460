"""Hostile values for property tests of validation (hypothesis strategies) and the checks they share:
a refused input names its field, and the command given it writes nothing."""

from __future__ import annotations

import copy
import math
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from click.testing import CliRunner
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cmscale.cli import main
from cmscale.tune.spec import run_setting_paths

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

HOSTILE_TEXT = ["../escape", "/tmp/abs", "..", ".", "", "a/b", ".hidden", "x\x00y", "é", "a b", "ok_name", "cuda:0",
                "auto", "cpu", "xxs", "xs", "digits", "cifar10", "edm", "ect", "sigmoid", "l2", "tpe", "local", "1e3"]
scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 0.999, 1.5, -1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 3, 4, 7, 8, 16, 18, 32, 1024, 10**9]),
    st.booleans(),
    st.sampled_from(HOSTILE_TEXT),
    st.text(max_size=8),
)
hostile_values = st.one_of(
    scalars,
    st.none(),
    st.lists(scalars, max_size=3),
    st.dictionaries(st.sampled_from(["a", "q", "lr", "type"]), scalars, max_size=2),
)

RUN_PATHS = sorted(run_setting_paths())
RUN_BASE = {"method": "edm", "preset": "xxs", "budget_iters": 2, "batch_size": 4, "eval": {"at_fractions": []}}


def set_path(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(raw)
    node = changed
    *parents, leaf = path.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return changed


def names_field(message: str, path: str) -> bool:
    """The message names the field: each part of its dotted path appears in it."""
    return all(part in message for part in path.split("."))


def drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: drop_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [drop_none(item) for item in value]
    return value


def toml_round_trip(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` written as TOML and read back; a null inside a free-form table (TOML has none) stays as it is."""
    if drop_none(raw) != raw:
        return raw
    return tomllib.loads(tomli_w.dumps(raw))


def finite(value: Any) -> bool:
    """No NaN or inf anywhere in an accepted input: each would be a budget or a rate never meant."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(item) for item in value)
    return True


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def refused_writes_nothing(args: list[str], file_name: str, raw: dict[str, Any], field: str) -> None:
    """Run the command on the refused input in a fresh folder: it exits 1 naming the field, and writes nothing."""
    if drop_none(raw) != raw:
        return  # TOML has no null: this input cannot be written as a file
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError):
        return  # nor can TOML hold this value (e.g. a NUL in a key)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / file_name).write_text(text)
        root = folder / "root"
        result = CliRunner().invoke(main, [*args, str(folder / file_name), "--root", str(root)])
        assert result.exit_code == 1, (field, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), result.exception  # a clean error, not a traceback
        assert files_under(folder) == [file_name], f"{field}: a refused input wrote {files_under(folder)}"
