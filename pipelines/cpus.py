"""The CPUs a training process may use, and the DataLoader workers `data.workers: auto` gives it."""

from __future__ import annotations

import os
from pathlib import Path

# Each process keeps two CPUs of its share: one for its own thread (the step's Python, and the decode thread of
# the gpu, hw and dali modes) and one for the pin-memory thread and the system.
KEPT_CPUS = 2


def usable_cpus() -> float:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (docker --cpus)."""
    count: float = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return count
    if quota != "max":
        count = min(count, int(quota) / int(period))
    return count


def auto_workers(cpus: float, host_processes: int) -> int:
    """Workers a process for `data.workers: auto`: its share of the host's `cpus` (torchrun starts
    `host_processes` on it) less the two it keeps; at least one, so that decode never runs in the training loop."""
    return max(1, int(cpus // host_processes) - KEPT_CPUS)


def worker_count(workers: int | str, host_processes: int) -> tuple[int, str]:
    """The DataLoader workers a process runs for `data.workers`, and why, in words for the run's log."""
    if workers != "auto":
        return int(workers), "set in the config"
    cpus = usable_cpus()
    return auto_workers(cpus, host_processes), (f"auto: {cpus:g} usable CPUs over {host_processes} process(es) on "
                                                f"this host, less {KEPT_CPUS} each")
