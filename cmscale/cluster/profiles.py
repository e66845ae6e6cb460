"""Cluster profiles: ``slurm/profiles/<name>.toml`` -> submitit executor parameters.

A profile holds what differs between clusters (partition, account, GPUs, time limit, setup lines,
the preemption signal's lead time). Profiles are looked up in ``$CMSCALE_PROFILE_DIR``, then
``./slurm/profiles``, then the ``slurm/profiles`` folder of the cmscale checkout; ``--profile``
may also be a path to a ``.toml`` file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from cmscale.config import (
    SAFE_NAME_PATTERN,
    ConfigError,
    SafeName,
    StrictModel,
    format_validation_error,
    read_toml,
    safe_path_component,
)


class Profile(StrictModel):
    name: SafeName = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int = Field(1, ge=1)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float = Field(4.0, gt=0)
    timeout_min: int = Field(60, ge=1)
    array_parallelism: int = Field(256, ge=1)
    signal_delay_s: int = Field(90, ge=0, description="seconds before the time limit that USR2 arrives")
    max_num_timeout: int = Field(3, ge=0, description="requeues on timeout or preemption before submitit gives up")
    max_array_size: int | None = Field(
        None, ge=1, description="cap on tasks per array; default: the cluster's MaxArraySize"
    )
    setup: list[str] = Field(
        default_factory=list, description="shell lines run before the job (module load, source env)"
    )
    sbatch_extra: dict[str, Any] = Field(default_factory=dict, description="extra #SBATCH parameters")

    def submitit_parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "mem_gb": self.mem_gb,
            "timeout_min": self.timeout_min,
            "slurm_array_parallelism": self.array_parallelism,
            "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_setup": list(self.setup),
            "slurm_additional_parameters": dict(self.sbatch_extra),
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(self, key)
            if value is not None:
                params[f"slurm_{key}"] = value
        return params


def profile_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("CMSCALE_PROFILE_DIR"):
        dirs.append(Path(os.environ["CMSCALE_PROFILE_DIR"]))
    dirs.append(Path.cwd() / "slurm" / "profiles")
    dirs.append(Path(__file__).resolve().parents[2] / "slurm" / "profiles")  # the checkout's slurm/
    return list(dict.fromkeys(path.resolve() for path in dirs))


def available_profiles() -> list[str]:
    names = set()
    for folder in profile_dirs():
        if folder.is_dir():
            names |= {path.stem for path in folder.glob("*.toml")}
    return sorted(names)


def load_profile(name_or_path: str) -> Profile:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" and candidate.is_file():
        path = candidate
    else:
        try:
            safe_path_component(name_or_path)
        except ValueError as error:
            raise ConfigError(f"profile: {error} (or give a path to a .toml file)") from None
        path = next(
            (
                folder / f"{name_or_path}.toml"
                for folder in profile_dirs()
                if (folder / f"{name_or_path}.toml").is_file()
            ),
            None,
        )
        if path is None:
            raise ConfigError(
                f"unknown profile {name_or_path!r}; available: {', '.join(available_profiles()) or '(none)'} "
                f"(looked in {', '.join(str(d) for d in profile_dirs())})"
            )
    raw = read_toml(path, "cluster profile")
    raw.setdefault("name", path.stem if SAFE_NAME_PATTERN.match(path.stem) else "custom")
    try:
        return Profile.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(str(path), error)) from None
