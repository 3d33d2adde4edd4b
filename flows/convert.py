"""The `convert-shards` flow: shards.convert as a Prefect task, retried on transient storage errors."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

import shards
from flows.retries import STORAGE_RETRIES
from shards import ConvertOptions, ConvertSummary, StoreError


@task(**STORAGE_RETRIES)
def convert_task(options: ConvertOptions) -> ConvertSummary:
    # A rerun after a failure resumes: finished shards are kept (see docs/store-format.md).
    summary = shards.convert(options, progress=False)
    logger = get_run_logger()
    for line in summary.skipped:
        logger.warning("skipped %s", line)
    logger.info(
        "%s -> %s: %d added, %d rejected, %d unchanged, store version %d",
        options.src, options.dest, summary.added, summary.rejected, summary.unchanged, summary.version,
    )
    return summary


@task(**STORAGE_RETRIES)
def verify_task(dest: str) -> None:
    """Check every shard's size, sha256 and sample count against the manifest; fail naming the first bad one."""
    problems = shards.verify(dest)
    if problems:
        raise StoreError(f"{dest} failed verification ({len(problems)} problems): {problems[0]}")


@flow(name="convert-shards", validate_parameters=True)
def convert_shards(options: ConvertOptions) -> ConvertSummary:
    """Convert (or --append) a raw image folder into a verified shard store."""
    summary = convert_task(options)
    verify_task(options.dest)
    return summary
