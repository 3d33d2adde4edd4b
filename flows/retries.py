"""When a task that talks to storage is retried: transient I/O failures yes, a StoreError never."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task

# Seconds before each retry: an object store blip or a NAS remount usually heals within a minute.
RETRY_DELAYS = [5, 20, 60]


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry I/O failures (OSError, which ConnectionError is, and botocore's): storage blips.

    Anything else, a StoreError (bad input or a bad store: the user's to fix) included, fails at once.
    """
    try:
        state.result()
    except (OSError, BotoCoreError):
        return True
    except Exception:
        return False
    return False


# Keyword arguments for @task on storage work.
STORAGE_RETRIES: dict[str, Any] = {"retries": len(RETRY_DELAYS), "retry_delay_seconds": RETRY_DELAYS,
                                   "retry_condition_fn": is_transient}
