"""SIGTERM/SIGINT inside a worker: finish the step, save, exit EXIT_PREEMPTED; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

EXIT_PREEMPTED: int = 75  # EX_TEMPFAIL: "saved on a signal, requeue me"
PREEMPTED_FILE = "preempted.json"  # left in the run dir by a preempted save; `launch` reads it

# torchrun forwards the signal it got to its workers, and a scheduler or a terminal often signals the
# workers directly as well: one request can arrive twice within moments. Only a signal after this
# many seconds counts as the user insisting.
DUPLICATE_WINDOW_S = 2.0


class Preemption:
    """While entered, SIGTERM and SIGINT only set `requested`; on exit the handlers before it return,
    so that a program that calls `training.run` gets its Ctrl-C back when the run is over."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.first_at: float | None = None
        self.previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # `run` called from a thread: no handlers
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.first_at is not None

    def _handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        elif now - self.first_at > DUPLICATE_WINDOW_S:
            os._exit(128 + signum)
