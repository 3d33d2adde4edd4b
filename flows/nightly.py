"""The `nightly-retrain` flow: append new images, resume training, evaluate, promote if better."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Literal
from uuid import UUID

from fsspec.core import url_to_fs
from prefect import flow, get_client, get_run_logger, task
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Crashed
from prefect.variables import Variable
from pydantic import BaseModel, Field, PositiveInt

import training
from flows.artifacts import publish_decision, publish_no_op
from flows.convert import convert_task, verify_task
from flows.promote import NightlyDecision, beats, production_url, promote, read_production
from flows.retries import STORAGE_RETRIES, storage_errors
from flows.train import train
from shards import ConvertOptions
from shards.storage import StoreError, url_problem

# A global concurrency limit of 1 (created on first use, in the server's database, so it also
# binds runs in ephemeral mode and runs started outside the deployment).
NIGHTLY_LIMIT = "nightly-retrain"
# How long the slot outlives a holder that died without releasing it (a host crash): the holder renews
# its lease every 3/4 of this, the server's repossessor frees an expired one within 15 s. Equal to the
# lease Prefect keeps on the deployment's own concurrency slot (300 s, not configurable), so a shorter
# one would not bring a rerun forward, only let a Prefect server outage of that length kill a healthy run.
NIGHTLY_LEASE_S = 300
# The flow run inside the slot (a Prefect variable): the next holder ends it as Crashed if it never finished.
HOLDER_VARIABLE = "nightly-retrain-holder"
# The store version the model was last trained on (storage, beside the checkpoints): a run that
# appended and then died has left new samples that a rerun, finding nothing new to append, must train on.
TRAINED_MARKER = "nightly/trained.json"


class NightlyResult(BaseModel):
    """What one night did: the flow's return value."""

    trained: bool
    added: int  # samples the append added to the store
    decision: NightlyDecision | None = None  # when it trained


def ensure_nightly_limit() -> None:
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(NIGHTLY_LIMIT, limit=1)


def continue_from_latest(config: str, overrides: list[str], epochs: int) -> list[str]:
    """Overrides that resume from the newest complete checkpoint and train `epochs` more epochs, over an lr
    schedule of their own: a warm restart (warm-up, then cosine) from the weights, optimizer state and EMA the
    checkpoint holds. Where that checkpoint's run had epochs left (a night killed mid-way), they finish it on its
    own schedule instead."""
    latest = training.latest_checkpoint(training.load_config(config, overrides))
    if latest is None:
        return [*overrides, f"train.epochs={epochs}", "optim.schedule_start_epoch=0", "resume=never"]
    if latest.epochs is not None and latest.epoch < latest.epochs:
        return [*overrides, f"train.epochs={latest.epochs}",
                f"optim.schedule_start_epoch={latest.schedule_start_epoch}", f"resume={latest.path}"]
    return [*overrides, f"train.epochs={latest.epoch + epochs}", f"optim.schedule_start_epoch={latest.epoch}",
            f"resume={latest.path}"]


def take_over_slot() -> None:
    """Record this run as the slot's holder, first ending the previous holder as Crashed if it is still RUNNING.

    A run whose host died stays RUNNING in the server forever (no process is left to report), and
    `prefect flow-run cancel` only leaves it Cancelling. Holding the slot now proves it dead: the slot
    came free only because that run stopped renewing its lease.
    """
    me = str(flow_run.id)
    previous = str(Variable.get(HOLDER_VARIABLE, default=""))  # a variable holds any JSON; this one a run id
    if previous and previous != me:
        with get_client(sync_client=True) as client:
            crash_unfinished(client, UUID(previous), me)
    Variable.set(HOLDER_VARIABLE, me, overwrite=True)


def crash_unfinished(client: SyncPrefectClient, run_id: UUID, successor: str) -> None:
    """Set `run_id` and its subflow runs (the training) to Crashed where they are running or cancelling."""
    try:
        dead = client.read_flow_run(run_id)
    except ObjectNotFound:  # deleted meanwhile
        return
    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
    )
    message = (f"its host died: the {NIGHTLY_LIMIT!r} slot's lease expired while it held it, and nightly "
               f"run {successor} took the slot over")
    for run in (dead, *children):
        if run.state is not None and (run.state.is_running() or run.state.is_cancelling()):
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            get_run_logger().warning("set flow run %s (%s) to Crashed: %s", run.name, run.id, message)


@task(**STORAGE_RETRIES)
def trained_on(storage: str) -> dict | None:
    """{"store", "version"} of the last night that trained and decided, or None before the first."""
    with storage_errors(storage):
        fs, path = url_to_fs(f"{storage.rstrip('/')}/{TRAINED_MARKER}")
        try:
            return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None


@task(**STORAGE_RETRIES)
def mark_trained(storage: str, store: str, version: int) -> None:
    with storage_errors(storage):
        fs, path = url_to_fs(f"{storage.rstrip('/')}/{TRAINED_MARKER}")
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, json.dumps({"store": store, "version": version}).encode())


def export_best(run_dir: Path, out: Path) -> list[Path]:
    """The run's best checkpoint in every export format its task has (training/export.py)."""
    # Imported here: it imports timm, torch and albumentations (3 s or more), which a night with nothing new to
    # train, or `prefect deploy` loading this flow, does without.
    from training.export import FORMATS, export

    cfg = training.load_config(run_dir / "config.yaml")
    files = [export(cfg, str(run_dir / "checkpoints" / "best.pt"), out / fmt, fmt)
             for fmt, tasks in FORMATS.items() if cfg.task in tasks]
    return list({path.name: path for group in files for path in group}.values())  # one config.json


@task(**STORAGE_RETRIES)  # promotion is idempotent: a retry rewrites the set, marker last
def decide(storage: str, run_dir: Path, summary: training.RunSummary) -> NightlyDecision:
    """Promote the run's best checkpoint, with its exports, if its eval metric beats production's."""
    production = read_production(storage)
    promoted = beats(summary, production)
    if promoted:
        with tempfile.TemporaryDirectory(prefix="shardtrain-export-") as tmp:
            exports = export_best(run_dir, Path(tmp))
            model = promote(storage, run_dir / "checkpoints" / "best.pt", summary, exports)
    else:
        model = production_url(storage) + "/model.pt"
    decision = NightlyDecision(promoted=promoted, metric=summary.metric, candidate=summary.best,
                               production=None if production is None else production.best, run=run_dir.name,
                               step=summary.best_step, model=model)
    get_run_logger().info("decision: %s", decision)
    return decision


@flow(name="nightly-retrain", validate_parameters=True)
def nightly_retrain(
    raw_dir: str,
    store: str,
    config: str,
    storage: str,
    epochs: PositiveInt = 1,
    train_anyway: bool = False,
    format: Literal["wds", "lmdb"] = "wds",
    overrides: tuple[str, ...] = (),
    nproc_per_node: PositiveInt = 1,
    val_fraction: Annotated[float, Field(ge=0, lt=1)] | None = None,
) -> NightlyResult:
    """Append new images from `raw_dir` to `store`; if any, train `epochs` more epochs and maybe promote.

    `val_fraction`: convert's --val-fraction for a `raw_dir` without split folders (None: 0.05 when the store
    is made, then the store's own)."""
    if problem := url_problem(storage):
        raise StoreError(f"storage: {problem}")
    logger = get_run_logger()
    ensure_nightly_limit()
    logger.info("acquiring the %r concurrency slot (waits while another nightly run holds it)", NIGHTLY_LIMIT)
    with concurrency(NIGHTLY_LIMIT, occupy=1, lease_duration=NIGHTLY_LEASE_S, strict=True):
        take_over_slot()
        # append=True also creates the store on the first night.
        summary = convert_task(ConvertOptions(src=raw_dir, dest=store, format=format, append=True,
                                              val_fraction=val_fraction))
        verify_task(store)
        untrained = trained_on(storage) != {"store": store, "version": summary.version}
        if not untrained and not train_anyway:
            logger.info("no new images in %s: nothing to train tonight", raw_dir)
            publish_no_op(raw_dir, store)
            return NightlyResult(trained=False, added=0)
        if summary.added == 0 and untrained:
            logger.info("store version %d of %s was never trained on (an earlier run died?): training now",
                        summary.version, store)
        run_overrides = continue_from_latest(
            config, [*overrides, f"data.path={store}", f"checkpoint.storage={storage}"], epochs
        )
        run = train(config, tuple(run_overrides), nproc_per_node)
        run_dir = training.run_dir(training.load_config(config, run_overrides))
        decision = decide(storage, run_dir, run)
        # After the decision: a run that dies before it trains again rather than skip the promotion.
        mark_trained(storage, store, summary.version)
        publish_decision(decision)
        return NightlyResult(trained=True, added=summary.added, decision=decision)
