"""Stop signals in each process of a run: the first asks for a checkpoint, a repeat is ignored, a later one insists.

A run is three levels of processes: `shardtrain train` (the launcher), torchrun, and the ranks (each with
its DataLoader workers, which outlive the signals: pipelines.loader). The signal can reach any of them:
the launcher alone (Kubernetes, `docker stop`, `kill PID`), the launcher's process group (a terminal's
Ctrl-C, `kill -- -PGID`) or every process (Slurm's `scancel`, systemd). Each level reacts to the first
signal once (the launcher passes it on, torchrun passes it to the ranks, a rank saves at the next agreed
step and exits EXIT_PREEMPTED), so the same request arriving by several paths is one request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

EXIT_PREEMPTED: int = 75  # EX_TEMPFAIL: "saved on a signal, requeue me"
PREEMPTED_FILE = "preempted.json"  # left in the run dir by a preempted save; `launch` reads it

# One request often arrives twice within moments: torchrun passes on the signal it got, and a
# scheduler or a terminal signals the workers (or torchrun) directly as well. Only a signal after this
# many seconds counts as the user insisting.
DUPLICATE_WINDOW_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered, SIGTERM and SIGINT call `first(signum)` once, ignore repeats within DUPLICATE_WINDOW_S
    and call `insist(signum)` for a later one. On exit the handlers before it return, so that a program
    that calls `training.run` or `training.launch` gets its Ctrl-C back when the run is over; or `after`, where
    given, takes their place (signal.SIG_IGN: a process whose exit code is decided by then). Handlers can
    be set only in the main thread; from another thread nothing is held."""

    def __init__(self, first: Callable[[int], None], insist: Callable[[int], None],
                 after: Callable[[int, FrameType | None], Any] | int | None = None) -> None:
        self.first, self.insist, self.after = first, insist, after
        self.first_at: float | None = None
        self.previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if self.after is None else self.after)

    @property
    def requested(self) -> bool:
        return self.first_at is not None

    def _handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
            self.first(signum)
        elif now - self.first_at > DUPLICATE_WINDOW_S:
            self.insist(signum)


def exit_now(code: int) -> None:
    """Exit with `code` at once, output flushed: for a signal that finds nothing started. A handler that raised
    SystemExit instead could land in an extension's import, where C code may clear it (torch's numpy probe
    does), leaving the module half made: the next import of it then failed with a traceback and exit 1."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_at_once(signum: int) -> None:
    """A second signal: stop now, without the checkpoint. Under torchrun the launcher says so (one line for
    the whole run); a rank started alone says it itself."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        print(insist_message(signum), file=sys.stderr, flush=True)
    os._exit(128 + signum)


def insist_message(signum: int) -> str:
    return (f"stopped at once on a second {signal.Signals(signum).name}, without saving; "
            "a rerun resumes from the last checkpoint")


def preemption_signals() -> StopSignals:
    """A rank's: the first signal sets `requested` (the loop saves at the next agreed step)."""
    return StopSignals(first=lambda signum: None, insist=exit_at_once)
