"""Ctrl-C during training: finish the iteration, checkpoint it, then stop."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["CtrlC"]


class CtrlC:
    """Inside the block the first SIGINT only sets :attr:`pressed` (the loop ends the
    iteration, checkpoints and stops); a second one interrupts at once. The previous handler is
    restored on exit. Outside the main thread signals cannot be caught: nothing changes."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: now

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
