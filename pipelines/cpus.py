"""The CPUs a training process may use, and the DataLoader workers `data.workers: auto` gives it."""

from __future__ import annotations

import os
from pathlib import Path

# Each process keeps two CPUs of its share: one for its own thread (the step's Python, and the decode thread of
# the gpu, hw and dali modes) and one for the pin-memory thread and the system.
KEPT_CPUS = 2


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (docker --cpus, a
    Kubernetes CPU limit)."""
    count: float = len(os.sched_getaffinity(0))
    quota = cgroup_quota(cgroup)
    return count if quota is None else min(count, quota)


def cgroup_quota(cgroup: Path) -> float | None:
    """The CPUs a cgroup's quota allows: v2's cpu.max ("200000 100000"), else v1's cpu.cfs_quota_us over
    cpu.cfs_period_us; None when there is no limit ("max", -1) or no such files."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return int(quota) / int(period)


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
