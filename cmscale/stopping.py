"""Stopping a run between steps: which signals stop it, and how the ranks agree on where.

SIGTERM (``scancel``, ``scontrol requeue``), SIGUSR2 (submitit, before a time limit or a
preemption; or a user asking a local run to stop) and SIGINT (Ctrl-C) only set a flag
(:class:`StopSignals`); the loop checks it at each step boundary, where the state is consistent,
saves a checkpoint, marks the run ``interrupted`` and returns. A second Ctrl-C aborts at once.

Data parallel: at each boundary the ranks agree (all-reduce of :data:`STOP_CODES`) whether any
was signalled, so all stop after the same step; rank 0 saves, every rank waits for the checkpoint
(barrier), and only then does rank 0 hand a USR2 on to the handler that was installed before
(submitit's, which requeues the job). Left to submitit, only rank 0 would stop on USR2 and the
other ranks would run on into a collective with no partner. Locally no such handler exists: the
run stops with its checkpoint, and started again it resumes exactly.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from cmscale.distributed import barrier, max_over_ranks

CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
# Held during a step, so that a handler installed by others (submitit's) can never run mid-step.
DEFERRED_SIGNALS = {signal.SIGTERM, signal.SIGUSR2}
# The ranks agree on the strongest request: USR2 (requeue) over SIGTERM over SIGINT.
STOP_CODES = {None: 0, "SIGINT": 1, "SIGTERM": 2, "SIGUSR2": 3}


@contextmanager
def signals_deferred():
    """Hold SIGTERM and USR2 until the end of the block, so handlers run between steps."""
    signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED_SIGNALS)


class StopSignals:
    """Catches the stop signals while a run trains (a context manager); restores the old handlers after.

    ``requested`` is the name of the signal received (None if none). ``requeue_handler`` is the
    USR2 handler that was installed before (submitit's), called by :meth:`hand_on`.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}
        self.requeue_handler: Callable | None = None

    def handler(self, signum: int, frame) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.requested == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.requested = name

    def __enter__(self) -> StopSignals:
        self.previous = {signum: signal.signal(signum, self.handler) for signum in CAUGHT_SIGNALS}
        previous_usr2 = self.previous[signal.SIGUSR2]
        self.requeue_handler = previous_usr2 if callable(previous_usr2) else None
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def agreed(self, world: int, device: torch.device) -> str | None:
        """The signal every rank stops on (the strongest any rank received), or None to go on."""
        code = max_over_ranks(STOP_CODES[self.requested], world, device)
        return next(name for name, value in STOP_CODES.items() if value == code)

    def hand_on(self, signal_name: str, is_writer: bool, world: int) -> None:
        """After the checkpoint: wait for every rank, then let the job's own USR2 handler requeue it."""
        if world > 1:
            barrier()  # the checkpoint is complete before any rank leaves
        if signal_name == "SIGUSR2" and is_writer and self.requeue_handler is not None:
            self.requeue_handler(signal.SIGUSR2, None)  # submitit: checkpoint, requeue, exit
