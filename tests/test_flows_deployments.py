"""The Prefect deployments end to end: a real `prefect server start`, a process work pool and
worker, `prefect deploy --all` from prefect.yaml, `prefect deployment run`, moto S3 as storage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path
from uuid import UUID

import pytest
import s3fs
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL, temporary_settings

import shards
import training
from shards import samples
from shards.manifest import ShardIndex, load_json
from tests.servers import start_group, stop_group
from tests.test_shards_dask import contents

REPO = Path(__file__).resolve().parents[1]
PREFECT = Path(sys.executable).with_name("prefect")
POOL = "shardtrain"
# Tiny training: timm's test_resnet (not the demo config's resnet18, 25x the weights: every checkpoint, upload
# to moto and export costs that much more, and no test here is about the model) at 32 px, a few dozen images.
TRAIN_OVERRIDES = ["model.name=test_resnet", "data.image_size=32", "data.batch_size=8", "data.workers=0"]
PER_CLASS = {"train": 6}  # written flat (SRC/<class>/), as most sources are: the store holds out 5% as val
CONFIG = "configs/demo.yaml"  # relative: flow runs start in the repo root (prefect.yaml's pull step)


def prefect_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PREFECT), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def prefect_env(prefect_server) -> dict[str, str]:
    """The env for the real Prefect server's CLI and worker (conftest's, shared with the other flow tests)."""
    return prefect_server.env


def scheduled_runs(client: SyncPrefectClient, deployment_id: UUID) -> list[FlowRun]:
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.state is not None and r.state.is_scheduled()]


@pytest.fixture(scope="module")
def nightly_schedule_runs(prefect_env, client) -> list[FlowRun]:
    """The work pool and `prefect deploy --all` from the repo's prefect.yaml; returns the runs that the nightly
    deployment's schedule made. Then the deployment is paused, which deletes them and makes no more, before any
    worker starts: else a suite running at 02:00 UTC had its worker start a real night on prefect.yaml's site
    defaults (/data/raw/images), holding the nightly slot beside the tests' own nights. Runs asked for with
    `prefect deployment run` go on as before."""
    created = prefect_cli(prefect_env, "work-pool", "create", "--type", "process", POOL)
    assert created.returncode == 0, created.stdout + created.stderr
    deploy = prefect_cli(prefect_env, "--no-prompt", "deploy", "--all")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    nightly = client.read_deployment_by_name("nightly-retrain/nightly")
    deadline = time.monotonic() + 15  # the scheduler looks at new deployments every second (conftest's server)
    while not (scheduled := scheduled_runs(client, nightly.id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    client.pause_deployment(nightly.id)
    assert scheduled_runs(client, nightly.id) == []
    return scheduled


@pytest.fixture(scope="module")
def deployed(prefect_env, nightly_schedule_runs) -> Iterator[dict[str, str]]:
    """The deployments (nightly_schedule_runs) and a running worker."""
    log = Path(prefect_env["PREFECT_HOME"]) / "worker.log"
    worker = start_group([str(PREFECT), "worker", "start", "--pool", POOL], prefect_env, log, REPO)
    try:
        yield prefect_env
    finally:
        stop_group(worker)


@pytest.fixture(scope="module")
def client(prefect_env) -> Iterator[SyncPrefectClient]:
    with temporary_settings(updates={PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as c:
            yield c


def run_deployment(env: dict[str, str], name: str, **params) -> UUID:
    """`prefect deployment run NAME --param k=v ...`; returns the flow run's id."""
    args = ["deployment", "run", name]
    for key, value in params.items():
        args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    out = prefect_cli(env, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    found = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
    assert found is not None, out.stdout
    return UUID(found.group(1))


def flow_logs(client: SyncPrefectClient, run_id: UUID) -> str:
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


def wait_for_log(client: SyncPrefectClient, run_id: UUID, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in flow_logs(client, run_id):
        assert time.monotonic() < deadline, f"no log line {text!r} from {run_id}:\n{flow_logs(client, run_id)}"
        time.sleep(1)


def task_runs(client: SyncPrefectClient, run_id: UUID) -> list:
    return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def wait_final(client: SyncPrefectClient, run_id: UUID, timeout: float = 600) -> FlowRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(0.5)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout}s:\n{flow_logs(client, run_id)}")


def assert_completed(client: SyncPrefectClient, run_id: UUID) -> FlowRun:
    run = wait_final(client, run_id)
    state = run.state
    assert state is not None  # wait_final returns a run in a final state
    assert state.is_completed(), f"{state.name}: {state.message}\n{flow_logs(client, run_id)}"
    return run


def decision_artifact(client: SyncPrefectClient, run_id: UUID) -> str:
    artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    [decision] = [a for a in artifacts if a.key == "nightly-decision"]
    assert isinstance(decision.data, str), decision.data  # a markdown artifact
    return decision.data


def remote_checkpoint(storage: str, tmp_path: Path) -> training.CheckpointRef | None:
    """The newest complete checkpoint in storage (an empty runs_dir, so nothing local is found)."""
    cfg = training.load_config(REPO / CONFIG, [f"runs_dir={tmp_path / 'no-runs'}", f"checkpoint.storage={storage}"])
    return training.latest_checkpoint(cfg)


def production_best(storage: str) -> float:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return json.loads(fs.cat(f"{storage}/models/production/metrics.json"))["best"]


def run_best(runs: Path) -> float:
    run_dir = training.run_dir(training.load_config(REPO / CONFIG, [f"runs_dir={runs}"]))
    return json.loads((run_dir / "metrics.json").read_text())["best"]


def test_deploy_creates_the_three_deployments(deployed, client):
    names = {(client.read_flow(d.flow_id).name, d.name) for d in client.read_deployments()}
    assert names == {("convert-shards", "manual"), ("train", "manual"), ("nightly-retrain", "nightly")}
    nightly = client.read_deployment_by_name("nightly-retrain/nightly")
    assert nightly.global_concurrency_limit.limit == 1
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *"


def test_nightly_schedule_creates_runs(nightly_schedule_runs):
    assert nightly_schedule_runs, "the scheduler created no runs for the nightly cron"
    assert all(r.expected_start_time.astimezone(timezone.utc).hour == 2 for r in nightly_schedule_runs)


def test_bad_parameter_is_refused_naming_it(deployed, tmp_path):
    out = prefect_cli(
        deployed, "deployment", "run", "nightly-retrain/nightly", "--param", "epochs=-3"
    )
    assert out.returncode != 0
    assert "epochs" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_train_fails_when_torchrun_fails(deployed, client, imagefolder_src, tmp_path):
    store = tmp_path / "store"
    shards.convert(shards.ConvertOptions(src=str(imagefolder_src), dest=str(store)), progress=False)
    # Passes the checks before torchrun; the worker refuses mixup with an odd batch.
    run_id = run_deployment(
        deployed, "train/manual", config=CONFIG,
        overrides=[*TRAIN_OVERRIDES, f"runs_dir={tmp_path}", f"data.path={store}", "train.mixup=0.8",
                   "data.batch_size=7"],
    )
    run = wait_final(client, run_id)
    assert run.state.is_failed()
    assert re.search(r"torchrun exited with code [1-9]", run.state.message), run.state.message
    # the trainer's own error, streamed into the flow's log (Prefect ships log lines in batches: they may reach the
    # server after the final state)
    wait_for_log(client, run_id, "must be even", timeout=30)


def test_train_refuses_a_missing_store_before_torchrun(deployed, client, tmp_path):
    run_id = run_deployment(
        deployed, "train/manual", config=CONFIG,
        overrides=[*TRAIN_OVERRIDES, f"runs_dir={tmp_path}", f"data.path={tmp_path / 'no-store'}"],
    )
    run = wait_final(client, run_id)
    assert run.state.is_failed()
    assert f"data.path: no shard store at {tmp_path / 'no-store'}" in run.state.message, run.state.message
    assert not (tmp_path / "demo").exists()  # no run dir


def test_nightly_refuses_storage_that_names_no_bucket(deployed, client, imagefolder_src, tmp_path):
    """Before, `s3://` became the local folder ./s3:/: checkpoints and the production model went there unsaid."""
    run_id = run_deployment(deployed, "nightly-retrain/nightly", raw_dir=str(imagefolder_src),
                            store=str(tmp_path / "store"), config=CONFIG, storage="s3://")
    run = wait_final(client, run_id)
    assert run.state.is_failed()
    assert "storage: s3:// names no bucket or folder after s3://" in run.state.message, run.state.message
    assert not (tmp_path / "store").exists()  # refused before the night's convert


def val_keys(store: Path) -> set[str]:
    return {
        it.key for idx in (store / "_index").glob("val-*.json") for it in load_json(ShardIndex, idx.read_text()).items
    }


@pytest.mark.slow
def test_nightly_three_nights(deployed, client, s3_bucket, tmp_path):
    """On a flat class-folder tree (SRC/<class>/*.jpg) with no extra parameters."""
    raw, store, runs = tmp_path / "raw", tmp_path / "store", tmp_path / "runs"
    storage = f"{s3_bucket}/shardtrain"
    samples.make_imagefolder(raw, per_class=PER_CLASS, size=32, flat=True)
    params = {
        "raw_dir": str(raw),
        "store": str(store),
        "storage": storage,
        "config": CONFIG,
        "epochs": 1,
        "overrides": [*TRAIN_OVERRIDES, f"runs_dir={runs}"],
    }
    classes = len(samples.class_names())
    per_night = classes * sum(PER_CLASS.values())

    # Night 1: a new store, training from scratch, the first model promoted.
    night1 = run_deployment(deployed, "nightly-retrain/nightly", **params)
    assert_completed(client, night1)
    manifest = shards.read_manifest(str(store))
    assert manifest.totals.samples == per_night
    assert manifest.holdout.fraction == 0.05 and manifest.splits["val"].samples > 0
    held_out = val_keys(store)
    first = remote_checkpoint(storage, tmp_path)
    assert first is not None and first.epoch == 1
    assert "| promoted | True |" in decision_artifact(client, night1)
    production = s3fs.S3FileSystem(skip_instance_cache=True).ls(f"{storage}/models/production", detail=False)
    assert sorted(p.rsplit("/", 1)[-1] for p in production) == [
        "config.json", "metrics.json", "model.onnx", "model.pt", "model.pt.complete", "model.safetensors"]
    assert production_best(storage) == run_best(runs)

    # Night 2 while something else holds the nightly slot: it waits; then, nothing new, a no-op.
    with concurrency("nightly-retrain", occupy=1, strict=True):
        night2 = run_deployment(deployed, "nightly-retrain/nightly", **params)
        wait_for_log(client, night2, "acquiring the 'nightly-retrain' concurrency slot")
        time.sleep(5)
        assert task_runs(client, night2) == []
    assert_completed(client, night2)
    assert shards.read_manifest(str(store)).version == manifest.version
    assert remote_checkpoint(storage, tmp_path) == first
    assert "nothing new" in decision_artifact(client, night2).lower()

    # Night 3: new images are appended, training resumes from night 1's checkpoint.
    samples.make_imagefolder(raw, per_class=PER_CLASS, size=32, seed=1, start=100, flat=True)
    night3 = run_deployment(deployed, "nightly-retrain/nightly", **params)
    assert_completed(client, night3)
    after = shards.read_manifest(str(store))
    assert after.totals.samples == 2 * per_night
    assert after.version == manifest.version + 1
    assert held_out < val_keys(store)  # night 1's held-out images are still held out, with some new ones
    resumed = remote_checkpoint(storage, tmp_path)
    assert resumed.epoch == 2 and resumed.step > first.step
    [train_run] = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[night3]))
    )
    # Matched across whitespace: the trainer's console wraps long lines when its output is a pipe.
    resumed_line = rf"resumed from .+?at\s+step\s+{first.step}\s+\(epoch\s+1,\s+batch\s+0\)"
    assert re.search(resumed_line, flow_logs(client, train_run.id), re.S)
    decision = decision_artifact(client, night3)
    assert "production before" in decision and "none yet" not in decision
    # The run's best carries over from night 1: promoted if night 3 beat it, else production kept.
    assert production_best(storage) == run_best(runs)


def test_transient_storage_outage_is_retried(deployed, client, moto_server, s3_bucket, imagefolder_src):
    """moto goes down before the conversion starts and comes back once the task waits to retry."""
    dest = f"{s3_bucket}/store"
    bucket = s3_bucket.removeprefix("s3://")
    moto_server.stop()
    try:
        run_id = run_deployment(
            deployed, "convert-shards/manual", options={"src": str(imagefolder_src), "dest": dest, "workers": 1}
        )
        wait_for_retry(client, run_id)
    finally:
        moto_server.start(buckets=(bucket,))
    assert_completed(client, run_id)
    assert shards.verify(dest) == []
    assert shards.read_manifest(dest).totals.samples > 0


def test_convert_shards_on_a_dask_cluster(deployed, client, dask_cluster, s3_bucket, imagefolder_src, tmp_path):
    """The flow's `dask` option: its convert task runs on a DaskTaskRunner of the cluster and spreads the
    conversion over the cluster's workers; the store is the single-host one."""
    dest = f"{s3_bucket}/store"
    run_id = run_deployment(deployed, "convert-shards/manual",
                            options={"src": str(imagefolder_src), "dest": dest, "dask": dask_cluster.address})
    assert_completed(client, run_id)
    assert {"convert_task", "decode_part", "build_shard"} <= dask_cluster.task_prefixes()
    reference = tmp_path / "store"
    shards.convert(shards.ConvertOptions(src=str(imagefolder_src), dest=str(reference), workers=1), progress=False)
    assert contents(dest) == contents(str(reference))


def wait_for_retry(client: SyncPrefectClient, run_id: UUID, timeout: float = 300) -> None:
    """Block until a task run of `run_id` failed once and waits for its retry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task_run in task_runs(client, run_id):
            if task_run.state is not None and task_run.state.name in ("AwaitingRetry", "Retrying"):
                return
        run = client.read_flow_run(run_id)
        assert run.state is None or not run.state.is_final(), (
            f"finished before any retry: {run.state.name}\n{flow_logs(client, run_id)}"
        )
        time.sleep(0.5)
    raise TimeoutError(f"no retry of {run_id} after {timeout}s:\n{flow_logs(client, run_id)}")
