"""The rate on convert's and verify's progress bars: items per second since the start, whatever the updates."""

from __future__ import annotations

import re

from rich.progress import Progress

from shards import ConvertOptions, convert, samples, verify
from shards.progress import RateColumn


def rate(progress: Progress) -> str:
    return RateColumn("images").render(progress.tasks[0]).plain


def test_a_burst_of_results_does_not_inflate_the_rate():
    """A pool hands results back a chunk at a time: 99 updates a few microseconds apart."""
    now = [0.0]
    progress = Progress(get_time=lambda: now[0], disable=True)
    task = progress.add_task("converting", total=200)
    now[0] = 1.0
    progress.advance(task, 1)
    for _ in range(99):
        now[0] += 1e-6
        progress.advance(task, 1)
    now[0] = 2.0
    assert rate(progress) == "50.0 images/s"
    progress.advance(task, 100)  # finished: the rate stays the one at the finish
    now[0] = 10.0
    assert rate(progress) == "100.0 images/s"


def test_verify_of_one_shard_shows_its_rate(tmp_path, capsys):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea"])
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert verify(str(tmp_path / "s"), progress=True) == []
    shown = re.search(r"1/1 (\S+) shards/s", capsys.readouterr().err)
    assert shown and float(shown.group(1)) > 0, shown  # was "0.0 shards/s"
