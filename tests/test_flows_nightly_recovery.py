"""A nightly run whose host died (kill -9 of the flow's process and everything under it) during its training,
on a real Prefect server: the next run, finding nothing new to append, still trains on the samples the dead
run appended, and sets the dead run and its training subflow to Crashed; the night after is a no-op.
(tests/faults/prefect_faults.py kills a deployment's worker host the same way.)"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from shards import samples
from tests.servers import PrefectServer

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 2, "val": 1}

NIGHTLY = """
import sys
from flows import nightly
# The server's shortest lease: a dead run's slot comes free about a minute after its death, not five.
nightly.NIGHTLY_LEASE_S = 60
# timm's test_resnet, not the demo config's resnet18 (25x the weights to checkpoint): the model is not what is tested
overrides = ("model.name=test_resnet", "data.image_size=32", "data.batch_size=8", "data.workers=0",
             f"runs_dir={sys.argv[4]}")
print("RESULT", nightly.nightly_retrain(raw_dir=sys.argv[1], store=sys.argv[2], config="configs/demo.yaml",
                                        storage=sys.argv[3], overrides=overrides).model_dump())
"""


@pytest.fixture
def server(tmp_path, monkeypatch) -> Iterator[PrefectServer]:
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS", "1")  # expired leases freed at once
    # A run waiting for the slot asks again within a second, not after up to 30 s (the server's Retry-After)
    monkeypatch.setenv("PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
    server = PrefectServer(tmp_path / "prefect")
    server.home.mkdir()
    server.start(cwd=REPO)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server) -> Iterator[SyncPrefectClient]:
    with temporary_settings(updates={PREFECT_API_URL: server.url}), get_client(sync_client=True) as c:
        yield c


def nightly_args(tmp_path: Path) -> list[str]:
    return [sys.executable, "-c", NIGHTLY, *(str(tmp_path / name) for name in ("raw", "store", "storage", "runs"))]


def nightly(server: PrefectServer, tmp_path: Path) -> dict:
    """One nightly-retrain run (the flow called in a process of its own, reporting to the server)."""
    out = subprocess.run(nightly_args(tmp_path), env=server.env, cwd=REPO, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    [line] = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    return ast.literal_eval(line.removeprefix("RESULT "))


def training_child(client: SyncPrefectClient, run: FlowRun) -> FlowRun | None:
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
    )
    return children[0] if children else None


def running_nightly(client: SyncPrefectClient) -> FlowRun | None:
    runs = [r for r in client.read_flow_runs() if r.parent_task_run_id is None and r.state and r.state.is_running()]
    return runs[0] if runs else None


@pytest.mark.slow
def test_a_dead_nightly_run_is_crashed_and_its_samples_trained_by_the_next(server, client, tmp_path):
    samples.make_imagefolder(tmp_path / "raw", per_class=PER_CLASS, size=32)
    assert nightly(server, tmp_path)["trained"] is True

    # Night 2 appends new samples, and its host dies while it trains on them.
    samples.make_imagefolder(tmp_path / "raw", per_class=PER_CLASS, size=32, seed=1, start=100)
    log = (tmp_path / "night2.log").open("w")
    proc = subprocess.Popen(nightly_args(tmp_path), env=server.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "night2.log").read_text()
            assert time.monotonic() < deadline, "night 2 never started training"
            dead = running_nightly(client)
            child = dead and training_child(client, dead)
            if child is not None and child.state.is_running():
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow's process and torchrun (the ranks die with torchrun)
        proc.wait()
    assert client.read_flow_run(dead.id).state.is_running()  # what the server is left with

    rerun = nightly(server, tmp_path)
    assert rerun["trained"] is True and rerun["added"] == 0
    for run in (client.read_flow_run(dead.id), training_child(client, dead)):
        assert run.state.is_crashed(), (run.name, run.state)
        assert "host died" in run.state.message
    # Trained on that store version now: the night after is a no-op again.
    assert nightly(server, tmp_path)["trained"] is False
