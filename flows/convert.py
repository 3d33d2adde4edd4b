"""The `convert-shards` flow: shards.convert as a Prefect task, retried on transient storage errors."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from botocore.exceptions import BotoCoreError
from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task

import shards
from shards import ConvertOptions, ConvertSummary, StoreError

# Seconds before each retry: an object store blip or a NAS remount usually heals within a minute.
RETRY_DELAYS = [5, 20, 60]


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry network and storage I/O failures; a StoreError (bad input, bad store) fails at once."""
    try:
        state.result()
    except StoreError:
        return False
    except (OSError, ConnectionError, BotoCoreError):
        return True
    except Exception:
        return False
    return False


@contextmanager
def default_sigterm() -> Iterator[None]:
    """Let shards.convert's forked pool workers inherit the default SIGTERM action.

    Inside a flow run, SIGTERM is Prefect's handler, which raises TerminationSignal; the pool
    ends its workers with SIGTERM, so each would print that traceback as it stops.
    """
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=is_transient)
def convert_task(options: ConvertOptions) -> ConvertSummary:
    # A rerun after a failure resumes: finished shards are kept (see docs/store-format.md).
    with default_sigterm():
        summary = shards.convert(options, progress=False)
    get_run_logger().info(
        "%s -> %s: %d added, %d rejected, %d unchanged, store version %d",
        options.src, options.dest, summary.added, summary.rejected, summary.unchanged, summary.version,
    )
    return summary


@task
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
