"""The `convert-shards` flow: shards.convert as a Prefect task, retried on transient storage errors.

With `options.dask` (a scheduler's address, or local:N), the task runs on that Dask cluster through
prefect-dask's DaskTaskRunner and spreads the conversion over the cluster's workers (shards.distributed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task

import shards
from flows.retries import STORAGE_RETRIES
from shards import ConvertOptions, ConvertSummary, StoreError

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


@task(**STORAGE_RETRIES)
def convert_task(options: ConvertOptions) -> ConvertSummary:
    # A rerun after a failure resumes: finished shards are kept (see docs/store-format.md).
    if options.dask is None:
        summary = shards.convert(options, progress=False)
    else:
        from distributed import worker_client  # imports distributed (a second): only --dask needs it

        # On a worker of the flow's DaskTaskRunner: a client of the same cluster, this task's thread seceding
        # from the worker's pool while it waits on the parts (prefect-dask's get_dask_client keeps it, which
        # leaves a cluster of one-thread workers one worker short, and deadlocks one of a single worker).
        with worker_client() as client:
            summary = shards.convert(options, progress=False, client=client)
    logger = get_run_logger()
    for line in summary.skipped:
        logger.warning("skipped %s", line)
    for line in [*summary.untrained_classes, *summary.rejected_classes, *summary.boxless_splits()]:
        logger.warning(line)
    kept = summary.kept_changes()
    if kept:
        logger.warning(kept)
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
    if options.dask is None:
        summary = convert_task(options)
    else:
        runner = dask_task_runner(options.dask)
        # ignore: a DaskTaskRunner runs its own future type, which with_options' invariant hint refuses
        summary = convert_on_dask.with_options(task_runner=runner)(options)  # type: ignore[arg-type]
    verify_task(options.dest)
    return summary


@flow(name="convert-shards-on-dask")
def convert_on_dask(options: ConvertOptions) -> ConvertSummary:
    """convert_task on the Dask cluster of this flow's task runner (set by convert_shards)."""
    return convert_task.submit(options).result()


def dask_task_runner(address: str) -> DaskTaskRunner:
    """A DaskTaskRunner on the scheduler at `address`, or on a LocalCluster of N one-thread processes for local:N."""
    from prefect_dask import DaskTaskRunner

    if address.startswith("local:"):
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs=shards.local_cluster_options(address))
    return DaskTaskRunner(address=address)
