"""Which failures the storage tasks retry: transient I/O yes, a StoreError (the user's to fix) never."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError
from prefect.states import Failed

from flows.retries import is_transient, storage_errors
from shards import StoreError


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
        (ConnectionResetError("reset by peer"), True),
        (OSError("[Errno 5] Input/output error"), True),
        (StoreError("no images found under /data/raw"), False),
        (ValueError("a bug, not the network"), False),
        # before, retried for ~85 s each: no retry writes credentials or turns a file into a folder
        (NoCredentialsError(), False),
        (NotADirectoryError(20, "Not a directory"), False),
        (PermissionError(13, "Permission denied"), False),
    ],
)
def test_retry_condition(error, retried):
    assert is_transient(None, None, Failed(data=error)) is retried


def test_what_no_retry_heals_is_one_store_error_naming_the_storage(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError) as err, storage_errors(str(tmp_path / "file")):
        (tmp_path / "file" / "nightly").mkdir()
    assert str(err.value) == f"storage {tmp_path / 'file'}: NotADirectoryError: [Errno 20] Not a directory: " \
                             f"'{tmp_path / 'file' / 'nightly'}'"
    with pytest.raises(StoreError) as err, storage_errors("s3://bucket/shardtrain"):
        raise NoCredentialsError()
    assert str(err.value) == ("storage s3://bucket/shardtrain: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment")
    with pytest.raises(ConnectionResetError), storage_errors("s3://bucket/shardtrain"):  # retried as it is
        raise ConnectionResetError("reset by peer")

