"""Real servers for tests and the fault campaign (tests/faults too): `from tests.servers import ...`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from unittest import mock


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

    @contextlib.contextmanager
    def serving(self, buckets: tuple[str, ...] = ()) -> Iterator[MotoServer]:
        """Started, with this process's AWS_* variables pointing at it (children inherit them);
        stopped, and the environment as it was, afterwards."""
        with mock.patch.dict(os.environ, self.env()):
            self.start(buckets)
            try:
                yield self
            finally:
                self.stop()

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


def start_group(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start a long-lived process in its own process group, so teardown (or a fault) can end all of it.
    Its output goes to `log`, which only the child keeps open (ours is closed once it has started)."""
    with log.open("w") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there 20 s later."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Block until the Prefect API at `url` answers /health; fail with its log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{log.read_text()}")


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with SQLite under `home`; `env` is what its CLI and workers need.

    The env is built from os.environ when `start` runs, so AWS_* variables set before (moto) reach
    the worker's flow runs.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def start(self, cwd: Path) -> None:
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home}/prefect.db",
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        log = self.home / "server.log"
        prefect = Path(sys.executable).with_name("prefect")
        self.proc = start_group(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)], self.env, log, cwd
        )
        try:
            wait_healthy(self.url, self.proc, log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


def ephemeral_prefect_env(home: Path) -> dict[str, str]:
    """The environment of a process that runs flows in Prefect's ephemeral mode (a server of its own,
    started on demand) with its database under `home`; no PREFECT_* of the caller's leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    )
    return env


class DaskCluster:
    """`dask scheduler` and `workers` x `dask worker` (one thread each, under a nanny that restarts a killed
    worker) on 127.0.0.1; they inherit this process's environment (AWS_* of a moto server started before)."""

    def __init__(self, home: Path, workers: int = 2) -> None:
        self.home, self.workers = home, workers
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        dask = str(Path(sys.executable).with_name("dask"))
        scheduler = [dask, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"]
        self.procs.append(start_group(scheduler, dict(os.environ), self.home / "scheduler.log", self.home))
        wait_for_port(self.port)
        worker = [dask, "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"]
        for n in range(self.workers):
            self.procs.append(start_group(worker, dict(os.environ), self.home / f"worker{n}.log", self.home))
        from distributed import Client

        with Client(self.address) as client:
            client.wait_for_workers(self.workers, timeout=60)

    def worker_pids(self) -> dict[str, int]:
        """The worker processes (under their nannies), by address."""
        from distributed import Client

        with Client(self.address) as client:
            return client.run(os.getpid)

    def keys_held(self) -> dict[str, int]:
        """How many results each worker holds in memory, by address."""
        from distributed import Client

        with Client(self.address) as client:
            return {address: len(keys) for address, keys in client.has_what().items()}

    def task_prefixes(self) -> set[str]:
        """The names of the functions the scheduler has run tasks of (decode_part, build_shard, ...)."""
        from distributed import Client

        with Client(self.address) as client:
            return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc)
        self.procs = []
