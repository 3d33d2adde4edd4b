"""The `nightly-retrain` flow: append new images, resume training, evaluate, promote if better."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_client, get_run_logger, task
from prefect.concurrency.sync import concurrency
from pydantic import PositiveInt

import training
from flows.artifacts import publish_decision, publish_no_op
from flows.convert import convert_task, verify_task
from flows.promote import beats, production_url, promote, read_production
from flows.retries import STORAGE_RETRIES
from flows.train import train
from shards import ConvertOptions

# A global concurrency limit of 1 (created on first use, in the server's database, so it also
# binds runs in ephemeral mode and runs started outside the deployment).
NIGHTLY_LIMIT = "nightly-retrain"


def ensure_nightly_limit() -> None:
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(NIGHTLY_LIMIT, limit=1)


def continue_from_latest(config: str, overrides: list[str], epochs: int) -> list[str]:
    """Overrides that resume from the newest complete checkpoint and train `epochs` more epochs."""
    latest = training.latest_checkpoint(training.load_config(config, overrides))
    if latest is None:
        return [*overrides, f"train.epochs={epochs}", "resume=never"]
    return [*overrides, f"train.epochs={latest['epoch'] + epochs}", f"resume={latest['path']}"]


@task(**STORAGE_RETRIES)  # promotion is idempotent: a retry rewrites the pair, marker last
def decide(storage: str, run_dir: Path, metrics: dict) -> dict:
    """Promote the run's best checkpoint if its eval metric beats production's; returns the decision."""
    production = read_production(storage)
    promoted = beats(metrics, production)
    if promoted:
        model = promote(storage, run_dir / "checkpoints" / "best.pt", metrics)
    else:
        model = production_url(storage) + "/model.pt"
    decision = {
        "promoted": promoted,
        "metric": metrics["metric"],
        "candidate": metrics["best"],
        "production": None if production is None else production["best"],
        "run": run_dir.name,
        "step": metrics["best_step"],
        "model": model,
    }
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
) -> dict:
    """Append new images from `raw_dir` to `store`; if any, train `epochs` more epochs and maybe promote."""
    logger = get_run_logger()
    ensure_nightly_limit()
    logger.info("acquiring the %r concurrency slot (waits while another nightly run holds it)", NIGHTLY_LIMIT)
    with concurrency(NIGHTLY_LIMIT, occupy=1, strict=True):
        # append=True also creates the store on the first night.
        summary = convert_task(ConvertOptions(src=raw_dir, dest=store, format=format, append=True))
        verify_task(store)
        if summary.added == 0 and not train_anyway:
            logger.info("no new images in %s: nothing to train tonight", raw_dir)
            publish_no_op(raw_dir, store)
            return {"trained": False, "added": 0}
        run_overrides = continue_from_latest(
            config, [*overrides, f"data.path={store}", f"checkpoint.storage={storage}"], epochs
        )
        metrics = train(config, tuple(run_overrides), nproc_per_node)
        run_dir = training.run_dir(training.load_config(config, run_overrides))
        decision = decide(storage, run_dir, metrics)
        publish_decision(decision)
        return {"trained": True, "added": summary.added, **decision}
