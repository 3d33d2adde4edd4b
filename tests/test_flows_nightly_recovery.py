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
from typing import IO

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from shards import samples
from tests.servers import PrefectServer

REPO = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 2, "val": 1}

NIGHTLY = """
import atexit, gc, sys, time
from pathlib import Path
from flows import nightly
# As the shardtrain CLI does: the interpreter's last collection walks everything prefect, torch and timm made (2 s).
atexit.register(gc.freeze)
while sys.argv[5] and not Path(sys.argv[5]).exists():  # imported; the flow runs when the test says
    time.sleep(0.1)
# The server's shortest lease: a dead run's slot comes free about a minute after its death, not five.
nightly.NIGHTLY_LEASE_S = 60
# timm's test_resnet, not the demo config's resnet18 (25x the weights to checkpoint): the model is not what is tested
overrides = ("model.name=test_resnet", "data.image_size=32", "data.batch_size=8", "data.workers=0",
             f"runs_dir={sys.argv[4]}")
print("RESULT", nightly.nightly_retrain(raw_dir=sys.argv[1], store=sys.argv[2], config="configs/demo.yaml",
                                        storage=sys.argv[3], overrides=overrides).model_dump())
"""


@pytest.fixture
def client(prefect_server) -> Iterator[SyncPrefectClient]:
    """A client of conftest's real Prefect server (shared with the deployment tests), which frees an expired lease
    within a second."""
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}), get_client(sync_client=True) as c:
        yield c


def start_nightly(server: PrefectServer, tmp_path: Path, go: Path | None = None, log: IO[str] | None = None
                  ) -> subprocess.Popen[str]:
    """One nightly-retrain run: the flow called in a process of its own, reporting to the server. With `go`, the
    process imports and then waits for that file before it runs the flow."""
    args = [sys.executable, "-c", NIGHTLY, *(str(tmp_path / name) for name in ("raw", "store", "storage", "runs"))]
    return subprocess.Popen([*args, str(go or "")], env=server.env, cwd=REPO, text=True,
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            start_new_session=log is not None)


def result(proc: subprocess.Popen[str]) -> dict:
    """What the run's flow returned."""
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout + stderr
    [line] = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return ast.literal_eval(line.removeprefix("RESULT "))


def nightly(server: PrefectServer, tmp_path: Path) -> dict:
    return result(start_nightly(server, tmp_path))


def training_child(client: SyncPrefectClient, run: FlowRun) -> FlowRun | None:
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
    )
    return children[0] if children else None


def running_nightly(client: SyncPrefectClient) -> FlowRun | None:
    """The nightly run in progress (the server also holds the deployment tests' runs, scheduled ones among them)."""
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
        parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),
    ), flow_filter=FlowFilter(name=FlowFilterName(any_=["nightly-retrain"])))
    return runs[0] if runs else None


@pytest.mark.slow
def test_a_dead_nightly_run_is_crashed_and_its_samples_trained_by_the_next(prefect_server, client, tmp_path):
    server = prefect_server
    samples.make_imagefolder(tmp_path / "raw", per_class=PER_CLASS, size=32)
    assert nightly(server, tmp_path)["trained"] is True

    # Night 2 appends new samples, and its host dies while it trains on them.
    samples.make_imagefolder(tmp_path / "raw", per_class=PER_CLASS, size=32, seed=1, start=100)
    log = (tmp_path / "night2.log").open("w")
    proc = start_nightly(server, tmp_path, log=log)
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

    # The rerun waits for the dead run's lease to expire (about a minute); the night after imports meanwhile.
    rerun, go = start_nightly(server, tmp_path), tmp_path / "go"
    night_after = start_nightly(server, tmp_path, go=go)
    try:
        rerun_result = result(rerun)
    except BaseException:
        night_after.kill()
        night_after.communicate()
        raise
    go.touch()
    assert rerun_result["trained"] is True and rerun_result["added"] == 0
    for run in (client.read_flow_run(dead.id), training_child(client, dead)):
        assert run.state.is_crashed(), (run.name, run.state)
        assert "host died" in run.state.message
    # Trained on that store version now: the night after is a no-op again.
    assert result(night_after)["trained"] is False
