"""Stop requests: SIGTERM (schedulers, ``kill``) and SIGINT (Ctrl-C) end a run cleanly.

The handler only records the signal; the training loop honours it at the next step boundary (or
epoch end), saves ``checkpoints/last.pt`` there and stops with ``Interrupted``, so a preempted job
loses at most one step and resumes with ``sparta train --resume``. A second signal while the first
is pending stops at once (KeyboardInterrupt), for a user who does not want to wait for the step.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

from .errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager installing the handlers (main thread only; elsewhere it stays inert)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def raise_if_requested(self, step: int, run_dir: object) -> None:
        """Called right after ``checkpoints/last.pt`` was saved at ``step``."""
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise Interrupted(f"stopped by {name} after step {step}; checkpoints/last.pt is saved: continue with "
                              f"sparta train --resume {run_dir}", self.signum)
