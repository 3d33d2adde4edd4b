"""Fixtures shared by the whole suite: real servers started for real, and raw image folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shards import samples
from tests.servers import DaskCluster, MotoServer


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("faults", "the fault campaign (tests/faults, -m faults)")
    group.addoption("--kills", type=int, default=20, help="kills (or faults) per scenario")
    group.addoption("--fault-seed", type=int, default=0, help="seed of the campaign's random choices")
    group.addoption("--fault-budget-s", type=float, default=None,
                    help="preemption trials: start none after this many seconds (each mode gets its turn per round)")


@pytest.fixture(scope="session")
def moto_server():
    with MotoServer().serving() as server:
        yield server


@pytest.fixture(scope="session")
def dask_cluster(moto_server, tmp_path_factory):
    """A Dask scheduler and two worker processes on 127.0.0.1 (after moto: they have its AWS_* variables)."""
    cluster = DaskCluster(tmp_path_factory.mktemp("dask"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def s3_bucket(moto_server, request) -> str:
    """A fresh bucket on the moto server; returns its `s3://` URL."""
    import s3fs

    name = "t" + str(abs(hash(request.node.nodeid)) % 10**10)
    moto_server.make_bucket(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def imagefolder_src(tmp_path_factory) -> Path:
    """A small ImageFolder tree (train/val splits) cut from the bundled photos. Read-only."""
    return samples.make_imagefolder(tmp_path_factory.mktemp("imagefolder"), size=48)


@pytest.fixture(scope="session")
def yolo_src(tmp_path_factory) -> Path:
    """A small YOLO set cut from the bundled photos. Read-only."""
    return samples.make_yolo(tmp_path_factory.mktemp("yolo"), size=96)


@pytest.fixture(scope="session")
def unlabeled_src(tmp_path_factory) -> Path:
    """A small nested tree of unlabeled photos. Read-only."""
    return samples.make_unlabeled(tmp_path_factory.mktemp("unlabeled"), size=48)


@pytest.fixture
def as_user() -> list[str]:
    """A command prefix that runs a subprocess bound by file permissions: empty for a plain user; for root,
    setpriv without the capabilities that let root read and write whatever the mode bits say."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file modes do not bind root")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
