"""Cluster profiles (cmscale.cluster.profiles): every field accepts and round-trips or is refused naming
the file and the field; a profile name is one folder name."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import tomli_w
from hostile_input import (
    SETTINGS,
    drop_none,
    files_under,
    finite,
    hostile_values,
    names_field,
    toml_round_trip,
)
from hypothesis import given
from hypothesis import strategies as st

from cmscale.cluster.profiles import Profile, load_profile
from cmscale.config import ConfigError


@SETTINGS
@given(path=st.sampled_from(sorted(Profile.model_fields)), value=hostile_values)
def test_profile_accepts_and_round_trips_or_names_the_field(path, value):
    raw = {path: value}
    try:
        text = tomli_w.dumps(drop_none(raw))
    except (TypeError, ValueError):
        return
    with tempfile.TemporaryDirectory() as folder:
        profile_path = Path(folder) / "p.toml"
        profile_path.write_text(text)
        try:
            profile = load_profile(str(profile_path))
        except ConfigError as error:
            assert str(profile_path) in str(error) and names_field(str(error), path), str(error)
            assert files_under(Path(folder)) == ["p.toml"]
            return
    assert finite(profile.model_dump()) and "/" not in profile.name
    assert Profile.model_validate_json(profile.model_dump_json()) == profile
    assert Profile.model_validate(toml_round_trip(profile.model_dump(mode="json", exclude_none=True))) == profile


@pytest.mark.parametrize("name", ["../up", "/etc/passwd", "..", "a/b"])
def test_profile_names_are_single_folder_names(name):
    with pytest.raises(ConfigError, match="not a safe folder name"):
        load_profile(name)
