"""Fixtures shared by the whole suite: real servers started for real, and raw image folders."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards import samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class MotoServer:
    """moto's S3 in server mode on 127.0.0.1, spoken to over HTTP; stop/start simulate an outage.

    Its state lives in the process, so a restart begins with no buckets: tests that
    restart it recreate their bucket (see `start(buckets=...)`).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, buckets: tuple[str, ...] = ()) -> None:
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        for bucket in buckets:
            self.make_bucket(bucket)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def make_bucket(self, name: str) -> None:
        import s3fs

        # exist_ok: after a restart, a trainer's retried upload may recreate its bucket first
        # (s3fs's makedirs creates missing buckets).
        s3fs.S3FileSystem(skip_instance_cache=True).makedirs(name, exist_ok=True)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    server.start()
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
