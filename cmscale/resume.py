"""The resume-config policy: a run resumed with settings that would change its result is refused.

``config.json`` records the settings a run started with; a resume compares the new config with it
field by field. Execution settings (:data:`RESUME_MAY_CHANGE`) may change freely; any other
difference needs ``--force``, and is then recorded in config.json as ``forced_changes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmscale.config import RunConfig
from cmscale.rundir import CONFIG_FILE, read_json

# Settings that cannot change a run's result: a resume may change them freely.
RESUME_MAY_CHANGE = frozenset({"log_every", "ckpt_every", "heartbeat_s", "device", "run_id", "sweep", "tensorboard"})


class ResumeConfigError(ValueError):
    """A resume asked for settings that change the run's result; the message names each field."""


def resume_differences(config: RunConfig, stored: dict[str, Any]) -> list[str]:
    """``field: stored -> new`` for each setting that differs from config.json and may change the result.

    Settings missing from an older config.json are not compared; RESUME_MAY_CHANGE never is."""
    new = config.model_dump(mode="json")
    may_change = set(RESUME_MAY_CHANGE)
    if config.teacher_run_id and stored.get("teacher_run_id") == config.teacher_run_id:
        may_change.add("teacher_ckpt")  # the same planned teacher, found under a moved results root
    differences = []
    for key in RunConfig.model_fields:
        if key in may_change or key not in stored:
            continue
        old_value, new_value = stored[key], new[key]
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            differences += [f"{key}.{sub}: {old_value.get(sub)!r} -> {new_value.get(sub)!r}"
                            for sub in sorted(set(old_value) | set(new_value))
                            if old_value.get(sub) != new_value.get(sub)]
        elif old_value != new_value:
            differences.append(f"{key}: {old_value!r} -> {new_value!r}")
    return differences


def check_resume_config(config: RunConfig, run_dir: Path, force: bool) -> list[str]:
    """Compare ``config`` with the run's config.json; refuse differences unless ``force``. Returns them."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        stored = read_json(path)
    except ValueError as error:
        raise ResumeConfigError(
            f"{path} is not valid JSON ({error}); remove {run_dir} to start the run fresh"
        ) from None
    differences = resume_differences(config, stored)
    if differences and not force:
        raise ResumeConfigError(
            f"{run_dir} holds a run started with other settings; resuming with these would change its result:\n  "
            + "\n  ".join(differences)
            + f"\nResume with the settings of {path}, train into another folder, or pass --force to continue "
            "with the new settings (recorded in config.json as forced_changes). Only "
            + ", ".join(sorted(RESUME_MAY_CHANGE - {"run_id", "sweep"})) + " may change freely."
        )
    return differences
