"""The config edge (cmscale.config): overrides, TOML files and integer bounds give one message naming
the file, the field and the fix, never a traceback from deep inside. Hostile values in every field of a
run config are accepted and round-trip or are refused naming the field; unsafe names, non-finite floats
and resolutions a dataset or preset cannot take are refused."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from hostile_input import (
    RUN_BASE,
    RUN_PATHS,
    SETTINGS,
    finite,
    hostile_values,
    names_field,
    refused_writes_nothing,
    set_path,
    toml_round_trip,
)
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from cmscale.cli.main import main
from cmscale.config import ConfigError, RunConfig, format_validation_error, load_run_config, safe_path_component
from cmscale.sweep.spec import SpecError, parse_spec

RUN = 'method = "edm"\npreset = "xxs"\nbudget_iters = 2\nlr = 0.001\n'


def test_set_into_a_value_names_the_key_and_the_fix(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN)
    with pytest.raises(ConfigError, match=r"(?s)run.toml \(with --set lr.x=1\).*lr.x: lr is a value \(0.001\)"):
        load_run_config(path, {"lr.x": 1})
    result = CliRunner().invoke(main, ["train", str(path), "--set", "lr.x=1", "--root", str(tmp_path)])
    assert result.exit_code != 0 and "lr is a value" in result.output and "Traceback" not in result.output


def test_a_non_utf8_run_file_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(RUN.encode() + b'# caf\xe9\n')
    with pytest.raises(ConfigError, match="run.toml: not UTF-8 text"):
        load_run_config(path)


@pytest.mark.parametrize("seed", [2**31, 2**64, -1])
def test_a_seed_the_store_cannot_hold_is_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        RunConfig(method="edm", preset="xxs", budget_iters=2, seed=seed)
    RunConfig(method="edm", preset="xxs", budget_iters=2, seed=2**31 - 1)


def test_a_trailing_newline_is_not_part_of_a_safe_name():
    with pytest.raises(ValueError, match="not a safe folder name"):
        safe_path_component("abc\n")
    assert safe_path_component("abc") == "abc"


def edm_spec(**changes) -> dict:
    return {"name": "s", "presets": ["xxs"], "seeds": [0], "budgets_flops": [1e8], "methods": {"edm": {}}} | changes


def refused_fields(error: ValidationError) -> set[str]:
    return {".".join(str(part) for part in item["loc"]) for item in error.errors()}


HOSTILE_NAMES = ["../escape", "/tmp/abs", "..", ".", "a/b", ".hidden", "", "x\x00y", "a b", "é"]


@SETTINGS
@given(path=st.sampled_from(RUN_PATHS), value=hostile_values)
def test_run_config_accepts_and_round_trips_or_names_the_field(path, value):
    raw = set_path(RUN_BASE, path, value)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        message = format_validation_error("run.toml", error)
        assert names_field(message, path), message
        refused_writes_nothing(["train"], "run.toml", raw, path)
        return
    assert finite(config.model_dump())
    assert RunConfig.model_validate_json(config.model_dump_json()) == config
    assert RunConfig.model_validate(toml_round_trip(config.model_dump(mode="json", exclude_none=True))) == config
    for name in (config.sweep, config.run_id, config.teacher_run_id):
        assert name is None or ("/" not in name and not name.startswith("."))


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_unsafe_sweep_and_run_ids_are_refused_naming_the_field(name):
    for field in ("sweep", "run_id", "teacher_run_id"):
        with pytest.raises(ValidationError) as caught:
            RunConfig(method="edm", preset="xxs", budget_iters=1, **{field: name})
        assert refused_fields(caught.value) == {field}
    with pytest.raises(SpecError, match=r"  - name: .*not a safe folder name"):
        parse_spec(edm_spec(name=name))


def test_resolution_above_the_dataset_bound_is_refused_with_the_bound():
    with pytest.raises(ValidationError) as caught:
        RunConfig(method="edm", preset="xxs", budget_iters=1, resolution=1024)
    assert refused_fields(caught.value) == {"resolution"} and "bound for dataset 'digits' (64)" in str(caught.value)
    with pytest.raises(SpecError, match=r"  - resolution: .*bound for dataset 'digits'"):
        parse_spec(edm_spec(resolution=1024))


@pytest.mark.parametrize("field,value", [("budget_flops", math.inf), ("lr", math.inf), ("lr", math.nan),
                                         ("heartbeat_s", math.inf), ("ema_rates", [1.5]), ("ema_rates", [1.0]),
                                         ("adam_betas", [0.9, 1.0]), ("ema_rates", [math.nan]),
                                         ("ema_sigma_rels", [0.3]), ("ema_sigma_rels", [0.0]),
                                         ("ema_sigma_rels", [math.nan])])
def test_non_finite_and_out_of_range_floats_are_refused(field, value):
    fields = {"method": "edm", "preset": "xxs", "budget_iters": 1}
    if field == "budget_flops":
        fields.pop("budget_iters")
    with pytest.raises(ValidationError) as caught:
        RunConfig(**fields, **{field: value})
    assert {path.split(".")[0] for path in refused_fields(caught.value)} == {field}


def test_resolution_not_divisible_by_the_downsampling_is_refused():
    with pytest.raises(ValidationError) as caught:
        RunConfig(method="edm", preset="xxs", budget_iters=1, resolution=18)
    assert refused_fields(caught.value) == {"resolution"}
    assert "not divisible by 4, the downsampling of preset 'xxs'" in str(caught.value)
