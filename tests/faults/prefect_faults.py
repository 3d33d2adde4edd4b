"""Fault campaign, Prefect part: the host of a Prefect worker dies (kill -9 of the worker, its flow-run
subprocess and torchrun) during a nightly-retrain deployment run; a new worker on a new host takes over.

A real `prefect server start`, a process work pool, `prefect deploy --all` from prefect.yaml and moto S3
as checkpoint storage. Night 1 runs clean (it also times the append and the training). Each trial then
adds a night of new images, starts the nightly deployment, kills the worker's host during the append or
the training, starts a new worker with an empty runs dir (a new host: the store is on shared disk, the
checkpoints in S3) and runs the nightly deployment again at once, then a third time.

Recovered = the rerun completes; the store passes verify with every raw image exactly once; training
resumed from a checkpoint in storage at or after the last night's final step and finished the night's
epoch; the third run completes (nothing new: a no-op) within THIRD_RUN_TIMEOUT_S; the killed run is Crashed
(set by the rerun), not left RUNNING.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

import shards
import training
from shards import samples
from tests.servers import MotoServer, PrefectServer, start_group, stop_group
from training.processes import kill_tree

REPO = Path(__file__).resolve().parents[2]

PREFECT = Path(sys.executable).with_name("prefect")
POOL = "shardtrain"
CONFIG = "configs/demo.yaml"
TRAIN_OVERRIDES = ["data.image_size=32", "data.batch_size=8", "data.workers=0"]
PER_CLASS = {"train": 4, "val": 2}
BUCKET = "faults-prefect"
RUN_TIMEOUT_S = 900  # a rerun may wait out the dead run's concurrency leases (300 s) before it starts
THIRD_RUN_TIMEOUT_S = 300


def prefect_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PREFECT), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)


def must(out: subprocess.CompletedProcess) -> str:
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, out.args))} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return start_group([str(PREFECT), "worker", "start", "--pool", POOL], env, log, REPO)


def host_crash(worker: subprocess.Popen) -> int:
    """kill -9 the worker and everything it started, as a host crash would; returns how many processes died.

    Stopped first, then killed, so no process can notice its parent's death and clean up (torchrun would).
    """
    pids = kill_tree(worker.pid)
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    worker.wait()
    return len(pids)


def run_nightly(env: dict[str, str], params: dict) -> UUID:
    args = ["deployment", "run", "nightly-retrain/nightly"]
    for key, value in params.items():
        args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    out = must(prefect_cli(env, *args))
    found = re.search(r"UUID: ([0-9a-f-]{36})", out)
    if found is None:
        raise RuntimeError(f"no flow run id in `prefect deployment run`'s output:\n{out}")
    return UUID(found.group(1))


def flow_logs(client: SyncPrefectClient, run_id: UUID) -> str:
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


def wait_final(client: SyncPrefectClient, run_id: UUID, timeout: float) -> FlowRun | None:
    """The run once in a final state, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1)
    return None


def completed(run: FlowRun | None) -> bool:
    """Whether `run` (wait_final's answer) ended Completed."""
    return run is not None and run.state is not None and run.state.is_completed()


def state_name(run: FlowRun | None, otherwise: str) -> str | None:
    """The name of the final state of `run` (wait_final's answer), or `otherwise` when it has none."""
    return run.state.name if run is not None and run.state is not None else otherwise


def wait_running(client: SyncPrefectClient, run_id: UUID, timeout: float = 300) -> FlowRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_running() and run.start_time is not None:
            return run
        time.sleep(0.2)
    raise TimeoutError(f"nightly run {run_id} not running after {timeout}s")


def phases(client: SyncPrefectClient, run_id: UUID) -> dict[str, tuple[datetime | None, datetime | None]]:
    """Start and end of the append (the convert task) and of the training (the train subflow) of a run."""
    found: dict[str, tuple[datetime | None, datetime | None]] = {}
    for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))):
        if task_run.name.startswith("convert_task"):
            found["append"] = (task_run.start_time, task_run.end_time)
    for child in client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
    ):
        found["train"] = (child.start_time, child.end_time)
    return found


def phase_at(client: SyncPrefectClient, run_id: UUID, moment: float) -> str:
    """Which part of the nightly run was under way at wall-clock `moment` (time.time())."""
    spans = phases(client, run_id)
    for name in ("train", "append"):
        start, end = spans.get(name, (None, None))
        if start is not None and start.timestamp() <= moment and (end is None or moment < end.timestamp()):
            return name
    if "train" in spans or ("append" in spans and spans["append"][1] is not None):
        return "between"
    return "before"


def train_child(client: SyncPrefectClient, run_id: UUID) -> FlowRun | None:
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
    )
    return children[0] if children else None


def resumed_from(client: SyncPrefectClient, run_id: UUID) -> tuple[str, int] | None:
    """(the `resume=` the flow gave training, the step the trainer says it resumed at); None if from scratch."""
    child = train_child(client, run_id)
    if child is None:
        return None
    resume = [o.split("=", 1)[1] for o in child.parameters.get("overrides", []) if o.startswith("resume=")]
    # Matched across whitespace: the trainer's console wraps long lines when its output is a pipe.
    found = re.search(r"resumed from\s+\S+\s.*?at\s+step\s+(\d+)", flow_logs(client, child.id), re.DOTALL)
    if not resume or found is None:
        return None
    return resume[-1], int(found.group(1))


def latest_remote(storage: str, empty_runs: Path) -> training.CheckpointRef | None:
    cfg = training.load_config(REPO / CONFIG, [f"runs_dir={empty_runs}", f"checkpoint.storage={storage}"])
    return training.latest_checkpoint(cfg)


def stored_exactly_once(store: Path, raw: Path) -> bool:
    """verify passes and the store's shard indexes list every raw image exactly once."""
    if shards.verify(str(store)):
        return False
    manifest = shards.read_manifest(str(store))
    stored: Counter[str] = Counter()
    for split in manifest.splits.values():
        for shard in split.shards:
            index = json.loads((store / "_index" / f"{shard.name}.json").read_text())
            stored.update(item["path"] for item in index["items"])
    expected = Counter(str(p.relative_to(raw)) for p in raw.rglob("*.jpg"))
    return stored == expected


def seconds(moment: datetime | None, since: float) -> float | None:
    return None if moment is None else round(moment.timestamp() - since, 1)


@contextmanager
def servers(work: Path):
    """moto S3 (the checkpoint storage) and a Prefect server whose env carries moto's AWS_* variables."""
    prefect = PrefectServer(work / "prefect")
    prefect.home.mkdir(parents=True)
    with MotoServer().serving(buckets=(BUCKET,)):
        prefect.start(cwd=REPO)
        try:
            with temporary_settings(updates={PREFECT_API_URL: prefect.url}), get_client(sync_client=True) as client:
                yield prefect.env, client
        finally:
            prefect.stop()


def run(work: Path, kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    work.mkdir(parents=True)
    raw, store, storage = work / "raw", work / "store", f"s3://{BUCKET}/shardtrain"
    trials = min(kills, 3)  # each trial costs minutes: a dead run's leases are waited out
    figures = {"prefect_worker_kills": 0, "prefect_recovered": 0, "prefect_worst_recovery_s": 0.0,
               "prefect_worst_slot_wait_s": 0.0, "prefect_resumed_from_storage": 0, "prefect_third_run_ok": 0,
               "prefect_dead_runs_crashed": 0}
    with servers(work) as (env, client):
        must(prefect_cli(env, "work-pool", "create", "--type", "process", POOL))
        must(prefect_cli(env, "--no-prompt", "deploy", "--all"))
        host = 0
        worker = start_worker(env, work / f"worker{host}.log")
        try:
            def params(host: int) -> dict:
                return {"raw_dir": str(raw), "store": str(store), "storage": storage, "config": CONFIG,
                        "epochs": 1, "overrides": [*TRAIN_OVERRIDES, f"runs_dir={work / f'host{host}' / 'runs'}"]}

            samples.make_imagefolder(raw, per_class=PER_CLASS, size=32)
            night1 = run_nightly(env, params(host))
            done = wait_final(client, night1, RUN_TIMEOUT_S)
            if done is None or not completed(done) or done.start_time is None:
                raise RuntimeError(f"night 1 did not complete:\n{flow_logs(client, night1)}")
            t0 = done.start_time.timestamp()
            spans: dict[str, tuple[float, float]] = {}
            for name, (began, ended) in phases(client, night1).items():
                if began is None or ended is None:
                    raise RuntimeError(f"night 1 completed, its {name} without a start or an end")
                spans[name] = (began.timestamp() - t0, ended.timestamp() - t0)
            print(f"night 1 clean in {done.total_run_time.total_seconds():.0f}s: append "
                  f"{spans['append'][0]:.1f}-{spans['append'][1]:.1f}s, train {spans['train'][0]:.1f}-"
                  f"{spans['train'][1]:.1f}s after the run started", flush=True)

            for trial in range(1, trials + 1):
                night = trial + 1
                before = latest_remote(storage, work / "no-runs")
                samples.make_imagefolder(raw, per_class=PER_CLASS, size=32, seed=night, start=100 * night)
                target = rng.choice(("append", "train"))
                start, end = spans[target]
                offset = rng.uniform(start, start + 0.8 * (end - start))

                killed = run_nightly(env, params(host))
                running = wait_running(client, killed)
                assert running.start_time is not None  # wait_running waits for it
                started = running.start_time.timestamp()
                time.sleep(max(0.0, started + offset - time.time()))
                kill_at = time.time()
                dead = host_crash(worker)
                figures["prefect_worker_kills"] += 1
                hit = phase_at(client, killed, kill_at)

                host += 1  # a new host: an empty runs dir; the store on shared disk, checkpoints in S3
                worker = start_worker(env, work / f"worker{host}.log")
                rerun = run_nightly(env, params(host))
                done = wait_final(client, rerun, RUN_TIMEOUT_S)
                rerun_ok = completed(done)
                recovery_s = round(time.time() - kill_at, 1)
                append_start = phases(client, rerun).get("append", (None, None))[0]
                slot_wait = seconds(append_start, kill_at)

                exact = rerun_ok and stored_exactly_once(store, raw)
                resumed = resumed_from(client, rerun) if rerun_ok else None
                after = latest_remote(storage, work / "no-runs")
                from_storage = (resumed is not None and resumed[0].startswith("s3://")
                                and before is not None and resumed[1] >= before.step)
                finished = after is not None and after.epoch == night

                third = run_nightly(env, params(host))
                third_done = wait_final(client, third, THIRD_RUN_TIMEOUT_S)
                third_ok = completed(third_done)

                left = client.read_flow_run(killed).state  # the rerun sets it Crashed once it holds the slot
                crashed = left is not None and left.is_crashed()
                figures["prefect_dead_runs_crashed"] += crashed

                recovered = rerun_ok and exact and from_storage and finished and third_ok and crashed
                figures["prefect_recovered"] += recovered
                figures["prefect_resumed_from_storage"] += from_storage
                figures["prefect_third_run_ok"] += third_ok
                if rerun_ok:
                    figures["prefect_worst_recovery_s"] = max(figures["prefect_worst_recovery_s"], recovery_s)
                if slot_wait is not None:
                    figures["prefect_worst_slot_wait_s"] = max(figures["prefect_worst_slot_wait_s"], slot_wait)
                print(f"kill {trial}/{trials} at {offset:.1f}s ({hit}, aimed at {target}; {dead} processes): rerun "
                      f"{state_name(done, 'not final')} {recovery_s}s after the kill (slot after "
                      f"{slot_wait}s), store exact={exact}, resumed={resumed and resumed[1]} from "
                      f"{'storage' if from_storage else 'not storage'} (last night's step "
                      f"{before and before.step}), epoch {after and after.epoch}/{night}, third run "
                      f"{state_name(third_done, 'blocked')}, dead run "
                      f"{left.name if left else None}: "
                      f"{'recovered' if recovered else 'NOT recovered'}", flush=True)
                if not recovered and done is not None:
                    print(flow_logs(client, rerun)[-3000:], flush=True)
        finally:
            stop_group(worker)
    return figures
