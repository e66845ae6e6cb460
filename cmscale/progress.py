"""Watching a run: progress in status.json, a log line per ``log_every``, and an optional TensorBoard log.

While a run trains, its ``status.json`` holds (besides ``state`` and ``updated``) ``step``,
``total_steps``, ``images_per_s`` (over the steps since the last report), ``loss`` (the last
step's) and ``eta_s`` (the remaining steps at that rate). It is rewritten at each ``log_every``
step and otherwise at most every :data:`STATUS_INTERVAL_S` seconds, so a fast run does not spend
its time writing files. The same numbers go to stdout, one line per ``log_every`` (a job's
``.out``). With ``tensorboard = true`` the run also writes TensorBoard event files into
``<run>/tensorboard/`` (the loss, the throughput and every eval's FID and KID), so
``tensorboard --logdir <root>`` shows every run of a study.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from cmscale.rundir import TENSORBOARD_DIR, RunState, write_status

STATUS_INTERVAL_S = 5.0  # the shortest time between two status.json writes between log steps


class TensorBoardMissingError(ImportError):
    """``tensorboard = true`` but the package is not installed; the message names the field and the fix."""


def check_tensorboard_installed() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise TensorBoardMissingError(
            "tensorboard = true needs the tensorboard package, which is not installed: "
            "pip install 'cmscale[tensorboard]' (or set tensorboard = false)")


class Progress:
    """Reports the progress of the run in ``run_dir`` (the writer rank only) from step ``start_step``.

    (The status written when the run starts, with ``resumed_from``, marks each resume; progress
    writes after it carry the progress fields only.)
    """

    def __init__(self, run_dir: Path, total_steps: int, batch_size: int, log_every: int, start_step: int,
                 tensorboard: bool = False, interval_s: float = STATUS_INTERVAL_S):
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.log_every = log_every
        self.interval_s = interval_s
        self.reported_step, self.reported_at = start_step, time.time()
        self.written_at = 0.0
        self.images_per_s: float | None = None
        self.writer = None
        if tensorboard:
            check_tensorboard_installed()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)

    def step(self, step: int, loss: float) -> None:
        """After optimiser step ``step`` (1-based) with loss ``loss``."""
        now = time.time()
        logged = step % self.log_every == 0 or step == self.total_steps
        if not logged and now - self.written_at < self.interval_s:
            return
        if step > self.reported_step and now > self.reported_at:
            self.images_per_s = (step - self.reported_step) * self.batch_size / (now - self.reported_at)
            self.reported_step, self.reported_at = step, now
        eta_s = (self.total_steps - step) * self.batch_size / self.images_per_s if self.images_per_s else None
        fields = {"step": step, "total_steps": self.total_steps, "images_per_s": self.images_per_s,
                  "loss": loss, "eta_s": eta_s}
        write_status(self.run_dir, RunState.RUNNING, **fields)
        self.written_at = now
        if logged:
            rate = f"{self.images_per_s:.1f} img/s" if self.images_per_s else "- img/s"
            eta = f"eta {eta_s:.0f} s" if eta_s is not None else "eta -"
            print(f"step {step}/{self.total_steps}  loss {loss:.6g}  {rate}  {eta}", flush=True)
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss, step)
                if self.images_per_s:
                    self.writer.add_scalar("train/images_per_s", self.images_per_s, step)

    def evals(self, rows: list[dict[str, Any]]) -> None:
        """An eval point's rows: FID and KID per sampler step count to TensorBoard."""
        if self.writer is None:
            return
        for row in rows:
            for metric in ("fid", "kid"):
                if row.get(metric) is not None:
                    self.writer.add_scalar(f"eval/{metric}_{row['sampler_steps']}step", row[metric], row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
