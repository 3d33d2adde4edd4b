"""A line when a loader has waited long for its next batch: a stuck worker or a stalled read shows, not a silent run."""

from __future__ import annotations

import threading
import time
import weakref


class StallWatch:
    """Each wait of a loader for its next batch, bracketed by `started()` and `ended()` (two attribute writes: the
    watch sits on the training process's path to every batch). A daemon thread looks a few times per `after_s`;
    after `after_s` of one wait it prints `line` ({s}: the seconds waited), again after each further `after_s`.
    `after_s` 0: no thread, no line."""

    def __init__(self, after_s: float, line: str) -> None:
        self.after_s, self.line = after_s, line
        self.since: float | None = None
        self._thread: threading.Thread | None = None

    def started(self) -> None:
        if self.after_s <= 0:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=watch, args=(weakref.ref(self), self.after_s), daemon=True,
                                            name="shardtrain-stall-watch")
            self._thread.start()
        self.since = time.monotonic()

    def ended(self) -> None:
        self.since = None


def watch(ref: weakref.ref[StallWatch], after_s: float) -> None:
    """The thread of one StallWatch; it ends with the watch (a weak reference, so that the loader can go)."""
    told_since, told = None, 0  # the wait last told of, and how many lines it got
    while True:
        time.sleep(min(after_s / 4, 5.0))
        w = ref()  # held only between two sleeps
        if w is None:
            return
        since, line = w.since, w.line
        del w
        if since is None:
            continue
        if since != told_since:
            told_since, told = since, 0
        waited = time.monotonic() - since
        if waited >= after_s * (told + 1):
            print(line.format(s=waited), flush=True)
            told += 1
