"""Which failures the storage tasks retry: transient I/O yes, a StoreError (the user's to fix) never."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError
from prefect.states import Failed

from flows.retries import is_transient
from shards import StoreError


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
        (ConnectionResetError("reset by peer"), True),
        (OSError("[Errno 5] Input/output error"), True),
        (StoreError("no images found under /data/raw"), False),
        (ValueError("a bug, not the network"), False),
    ],
)
def test_retry_condition(error, retried):
    assert is_transient(None, None, Failed(data=error)) is retried

