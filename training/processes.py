"""The processes under a launcher, found from /proc: torchrun, the ranks (each in a process group of its
own, so no group signal reaches them all) and their DataLoader workers."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, parents first; [pid] alone where there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # exited while we looked
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and everything below it (returned). Stopped first, so none sees its parent die and acts on it."""
    pids = descendants(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
    return pids
