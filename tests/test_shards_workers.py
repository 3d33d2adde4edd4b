"""shards.workers.ordered_map with real worker processes (forked, or from a fork server): a death mid-message is
reported, not waited on; a dead parent takes its workers with it; a task's exception reaches the caller."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shards.workers import WorkerDied, ordered_map


def big_second(i: int) -> bytes:
    return b"x" * (64 << 20) if i == 1 else b"small"


def wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except FileNotFoundError:
        return ""


def next_within(results, seconds: float):
    """next(results) on a daemon thread, so that a hang fails the test rather than the suite."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(value=_outcome(results)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no result and no error within {seconds} s"
    return out["value"]


def _outcome(results):
    try:
        return next(results)
    except Exception as e:
        return e


def test_a_worker_killed_mid_message_is_an_error_at_once():
    """ProcessPoolExecutor hangs here for good: its manager thread waits on the rest of the cut-off message."""
    before = set(multiprocessing.active_children())
    results = ordered_map(big_second, [0, 1, 2, 3], workers=2, chunksize=1)
    assert next(results) == b"small"
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while not (sending := [p for p in workers if wchan(p.pid).endswith("pipe_write")]):
        assert time.monotonic() < deadline, "no worker blocked writing its 64 MiB result"
        time.sleep(0.01)
    os.kill(sending[0].pid, signal.SIGKILL)
    error = next_within(results, 30)
    assert isinstance(error, WorkerDied) and str(error) == "killed by SIGKILL"
    assert not any(p.is_alive() for p in workers)  # the other one too


@pytest.mark.parametrize("start", [None, "forkserver"])  # forkserver: where this process has started CUDA
def test_results_come_in_task_order_and_a_task_error_reaches_the_caller(start):
    assert list(ordered_map(abs, list(range(-40, 0)), workers=3, chunksize=3, start=start)) == list(range(40, 0, -1))
    with pytest.raises(ValueError, match="'seven'"):
        list(ordered_map(int, ["1", "2", "seven", "4"], workers=2, chunksize=1, start=start))
    assert not multiprocessing.active_children()


PARENT = """
import sys, time
from shards.workers import ordered_map
for _ in ordered_map(time.sleep, [0.2] * 1000, workers=2, chunksize=1):
    print("result", flush=True)
"""


def test_workers_end_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=Path(__file__).parents[1])
    assert parent.stdout is not None and parent.stdout.readline() == b"result\n"
    workers = [int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    assert len(workers) == 2
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while alive := [pid for pid in workers if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, f"workers {alive} outlived their parent"
        time.sleep(0.05)
