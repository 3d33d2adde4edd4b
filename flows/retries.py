"""When a task that talks to storage is retried: transient I/O failures yes, a StoreError never."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import BotoCoreError
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task

from shards.storage import StoreError, public_url, storage_error

# Seconds before each retry: an object store blip or a NAS remount usually heals within a minute.
RETRY_DELAYS = [5, 20, 60]


def transient(e: BaseException) -> bool:
    """Whether a retry may heal `e`: an I/O failure (OSError, which ConnectionError is, and botocore's), a storage
    blip. Not missing credentials, nor a path that is a file or not ours to write: those stay until fixed."""
    if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore's, by name
        return False
    if isinstance(e, (NotADirectoryError, IsADirectoryError, PermissionError)):
        return False
    return isinstance(e, (OSError, BotoCoreError))


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry what `transient` says a retry may heal. Anything else, a StoreError (bad input or a bad store: the
    user's to fix) included, fails at once."""
    try:
        state.result()
    except Exception as e:
        return transient(e)
    return False


@contextlib.contextmanager
def storage_errors(storage: str) -> Iterator[None]:
    """Inside: a storage failure that no retry heals raised as one StoreError line naming `storage` (what to set
    for missing S3 credentials); a transient one as it is, for `is_transient` to retry."""
    try:
        yield
    except (OSError, BotoCoreError) as e:
        if transient(e):
            raise
        raise StoreError(f"storage {public_url(storage)}: {storage_error(e)}") from None


# Keyword arguments for @task on storage work.
STORAGE_RETRIES: dict[str, Any] = {"retries": len(RETRY_DELAYS), "retry_delay_seconds": RETRY_DELAYS,
                                   "retry_condition_fn": is_transient}
