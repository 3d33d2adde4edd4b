"""Fixtures shared by the whole suite: real servers started for real, and raw image folders."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

from shards import samples
from tests.servers import DaskCluster, MotoServer, PrefectServer

REPO = Path(__file__).resolve().parents[1]


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


# Session servers, by fixture name, with how to stop them: each is stopped after the last test that uses it
# (pytest_runtest_teardown) rather than idle through the rest of the session.
_stop_after_last_use: dict[str, Callable[[], None]] = {}


@pytest.hookimpl(trylast=True)  # after pytest's own teardown: the module fixtures (a worker) are gone by then
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    later = item.session.items[item.session.items.index(item) + 1:] if nextitem is not None else []
    for name in list(_stop_after_last_use):
        if not any(name in getattr(test, "fixturenames", ()) for test in later):
            _stop_after_last_use.pop(name)()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, moto_server) -> Iterator[PrefectServer]:
    """A real `prefect server start` (SQLite in a temp dir), shared by the flow test modules: starting one takes
    10 s or more. Started after moto_server, so its env carries the AWS_* variables to the flow runs it starts."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect"))
    settings = {
        # A run waiting for the nightly slot asks again within a second of it coming free, not after up to 30 s
        # (the server's Retry-After, drawn around the limit's average occupancy: a night's whole run).
        "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
        # An expired lease (a dead holder's slot) is freed within a second of expiring, not 15.
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
        # A new deployment's schedule makes its runs within a second, not up to 5.
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    }
    with mock.patch.dict(os.environ, settings):
        server.start(cwd=REPO)
    _stop_after_last_use["prefect_server"] = server.stop
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dask_cluster(moto_server, tmp_path_factory):
    """A Dask scheduler and two worker processes on 127.0.0.1 (after moto: they have its AWS_* variables).

    One per module that uses it: it starts in 3 s, and idle it takes a tenth of a core (5 CPU-s a minute), which
    the session's tests between and after its two modules would otherwise pay."""
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
