"""Process trees, for tests that signal a launcher and check what became of everything under it."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (from /proc): the launcher, torchrun, the ranks and their DataLoader workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # exited while we looked
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found
