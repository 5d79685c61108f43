"""Ctrl-C or SIGTERM during training: finish the iteration, checkpoint it, then stop.

SIGTERM is what schedulers (SLURM, Kubernetes, ``torchrun``) send before they kill a job; it is
treated as the first Ctrl-C, so a preempted run leaves a checkpoint of its last iteration.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["CtrlC", "Stopped", "SIGNALS"]

#: The signals that stop a run after its current iteration.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal after checkpointing; :attr:`signum` is the signal (the CLI
    exits with ``128 + signum``: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class CtrlC:
    """Inside the block the first SIGINT or SIGTERM only sets :attr:`pressed` and
    :attr:`signum` (the loop ends the iteration, checkpoints and stops); a second one acts at
    once (Ctrl-C interrupts, SIGTERM terminates). The previous handlers are restored on exit.
    Outside the main thread signals cannot be caught: nothing changes."""

    def __init__(self) -> None:
        self.pressed = False
        self.signum = signal.SIGINT
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.pressed, self.signum = True, signum
        for sig in SIGNALS:  # a second signal: now
            signal.signal(
                sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            )

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
