"""A run's checkpoints: atomic files, and one object that saves and loads every stateful part.

:class:`CheckpointIO` (in the manner of EDM2's ``CheckpointIO``) is given the run's stateful
parts by name (the network wrapper, the modules trained alongside it, the EMAs, the optimiser),
each with ``state_dict``/``load_state_dict`` (a list of such parts is stored as a list). It
writes them, with plain values such as the step, into one ``torch.save`` file, and loads them
back; on a resume it tries ``latest.pt``, then ``previous.pt``, setting aside a file that cannot
be loaded (:meth:`CheckpointIO.load_newest`).

A checkpoint is written to a temporary file, synced, and renamed into place; the one it replaces
is first renamed to ``previous.pt``, so a good checkpoint is on disk at every moment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from cmscale.rundir import latest_checkpoint, previous_checkpoint


class CheckpointError(RuntimeError):
    """No checkpoint of the run could be loaded; the message names each file and what was wrong."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); its temporary file is gone,
    the checkpoint before it is untouched, and the message names the file and the fix."""


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def save_checkpoint(path: Path, payload: dict[str, Any], previous: Path | None = None) -> None:
    """Write to a temporary file, sync it, then rename: a reader never sees a half-written checkpoint.

    With ``previous``, the checkpoint being replaced is first renamed there, so a good one stays
    on disk until the new one is complete (a crash between the two renames leaves only ``previous``,
    which a resume finds)."""
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_path, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        tmp_path.unlink(missing_ok=True)  # the partial file would only hold the space the disk lacks
        reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else first_line(error)
        raise CheckpointWriteError(
            f"{path}: cannot write the checkpoint ({reason}); the previous checkpoint is intact. Free space on "
            "that file system (or make it writable), then run the same command again to resume") from None
    if previous is not None and path.is_file():
        os.replace(path, previous)
    os.replace(tmp_path, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None if absent); an unreadable file raises CheckpointError naming it."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - empty, truncated or foreign files all mean "unreadable"
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {first_line(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint")
    return state


def move_aside(path: Path) -> Path:
    """Rename a bad file out of the way (kept for inspection, never read again)."""
    target = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    return target


def metadata_mismatches(stored: dict, expected: dict) -> list[str]:
    """``key: checkpoint has A, the run has B`` for each metadata key present in both that differs."""
    problems = []
    for key, wanted in expected.items():
        if key in stored and stored[key] != wanted:
            problems.append(f"{key}: the checkpoint has {stored[key]!r}, the run has {wanted!r}")
    return problems


class CheckpointIO:
    """Saves and loads the named stateful parts of a run as one checkpoint.

    ``CheckpointIO(model=net, emas=emas, optimizer=opt)``: each part has ``state_dict`` and
    ``load_state_dict``; a list of parts is stored as the list of their states. ``meta`` (plain
    values that identify the run, such as preset and method) is written into every checkpoint and
    checked on load: a checkpoint made for another run raises CheckpointError.
    """

    def __init__(self, meta: dict[str, Any] | None = None, **parts: Any):
        self.meta = dict(meta or {})
        self.parts = parts

    def state_dict(self, **values: Any) -> dict[str, Any]:
        """The checkpoint's content: the meta, every part's state, and ``values`` (step, clocks)."""
        state = dict(self.meta)
        for name, part in self.parts.items():
            state[name] = [item.state_dict() for item in part] if isinstance(part, list) else part.state_dict()
        return state | values

    def load_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """Load every part from ``state``; returns the rest of it (step, clocks) for the caller."""
        problems = metadata_mismatches(state, self.meta)
        if problems:
            raise CheckpointError(f"made for another run: {'; '.join(problems)}")
        for name, part in self.parts.items():
            if isinstance(part, list):
                for item, item_state in zip(part, state[name]):
                    item.load_state_dict(item_state)
            else:
                part.load_state_dict(state[name])
        return {key: value for key, value in state.items() if key not in self.parts and key not in self.meta}

    def save(self, path: Path, previous: Path | None = None, **values: Any) -> None:
        save_checkpoint(path, self.state_dict(**values), previous=previous)

    def load_newest(self, run_dir: Path, move_bad: bool) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
        """Load ``latest.pt``, else ``previous.pt``: (the file loaded, the rest of its state, notes).

        A file that cannot be loaded is named in the notes (and, with ``move_bad``, moved aside);
        raises CheckpointError when checkpoints exist but none loads; (None, None, []) when none exists."""
        notes: list[str] = []
        for path in (latest_checkpoint(run_dir), previous_checkpoint(run_dir)):
            try:
                state = load_checkpoint(path)
                if state is None:
                    continue
                return path, self.load_state_dict(state), notes
            except Exception as error:  # noqa: BLE001 - a bad checkpoint of any kind is set aside, not fatal yet
                detail = str(error)
                if not isinstance(error, CheckpointError):
                    detail = f"{type(error).__name__}: {first_line(error)}"
                if str(path) not in detail:
                    detail = f"{path}: {detail}"
                if move_bad and path.is_file():
                    detail += f"; moved to {move_aside(path).name}"
                notes.append(detail)
        if notes:
            raise CheckpointError("; ".join(notes) + f". No good checkpoint is left; to start the run fresh, remove "
                                  f"{run_dir} (or train into another folder)")
        return None, None, notes
