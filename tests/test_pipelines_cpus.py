"""pipelines.cpus: the CPUs a process may use, and what `data.workers: auto` makes of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.cpus import auto_workers, cgroup_quota, usable_cpus, worker_count


def test_auto_workers_are_a_process_share_of_the_cpus_less_two_and_at_least_one():
    hosts = [(16, 1), (112, 8), (64, 8), (7.5, 1), (2, 1), (4, 2)]  # (CPUs, torchrun processes on the host)
    assert [auto_workers(cpus, processes) for cpus, processes in hosts] == [14, 12, 6, 5, 1, 1]


def test_usable_cpus_follow_the_affinity_mask(tmp_path):
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(mask)})
        assert usable_cpus(tmp_path) == 1  # tmp_path: a cgroup folder without a quota
        cpus = usable_cpus()  # this machine's cgroup may cap it further
        assert cpus <= 1
        why = f"auto: {cpus:g} usable CPUs over 1 process(es) on this host, less 2 each"
        assert worker_count("auto", 1) == (1, why)
    finally:
        os.sched_setaffinity(0, mask)
    assert usable_cpus() <= len(mask)


def test_a_number_of_workers_is_taken_as_set():
    assert worker_count(3, 8) == (3, "set in the config")
    assert worker_count(0, 1) == (0, "set in the config")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000\n"}, None),                                          # cgroup v2, no limit
    ({"cpu.max": "250000 100000\n"}, 2.5),                                        # docker --cpus 2.5
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1, no limit
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({}, None),                                                                   # no cgroup files
])
def test_a_cgroup_cpu_quota_caps_the_usable_cpus(tmp_path, files, quota):
    for name, text in files.items():
        write(tmp_path / name, text)
    assert cgroup_quota(tmp_path) == quota
    cpus = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == (cpus if quota is None else min(cpus, quota))
