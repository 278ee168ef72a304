"""Stop requests: SIGTERM (schedulers, ``kill``) and SIGINT (Ctrl-C) end a run cleanly.

The handler only records the signal; the training loop honours it at the next step boundary (or
epoch end), saves ``checkpoints/last.pt`` there and stops with ``Interrupted``, so a preempted job
loses at most one step and resumes with ``sparta train --resume``. A second signal while the first
is pending stops at once (KeyboardInterrupt), for a user who does not want to wait for the step.

The handler may run at any instant, also between a boundary's decision and the save it leads to, so
the loop acts only on the value ``agree`` fixed at the boundary (under torchrun, the same on every
rank); a signal that lands after it is honoured at the next boundary. Acting on the live flag would
let the one rank that got the signal stop alone while the others wait for it in a collective.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

from .errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager installing the handlers (main thread only; elsewhere it stays inert)."""

    def __init__(self) -> None:
        self.received: int | None = None  # written by the handler, at any instant
        self.agreed: int | None = None  # the decision taken at the last boundary
        # the handlers to restore, as signal.signal returns them
        self._previous: dict[int, Callable[[int, FrameType | None], object] | int | signal.Handlers | None] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def agree(self, share: Callable[[int | None], int | None]) -> bool:
        """Take this boundary's decision: ``share`` (``Distributed.share_signal``) turns the signal this
        process received, if any, into the one all ranks act on. True: save and stop here."""
        self.agreed = share(self.received)
        return self.agreed is not None

    def raise_if_requested(self, step: int, run_dir: object) -> None:
        """Called right after ``checkpoints/last.pt`` was saved at ``step``."""
        if self.agreed is not None:
            name = signal.Signals(self.agreed).name
            raise Interrupted(f"stopped by {name} after step {step}; checkpoints/last.pt is saved: continue with "
                              f"sparta train --resume {run_dir}", self.agreed)
