"""The rich progress bar for long work: items done, items/s, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second since the task started. rich's own `speed` spans the last few updates only: a
    burst of results at once made it absurd (151407.6 images/s), and a single update left it at 0."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        rate = f"{task.completed / elapsed:.1f}" if elapsed else "-"
        return Text(f"{rate} {self.unit}/s", style="progress.data.speed")


def progress_bar(enabled: bool, unit: str) -> Progress:
    """A bar on stderr counting `unit`s (images, shards); does nothing when not `enabled`."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
