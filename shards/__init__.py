"""Raw image folders to verified WebDataset or LMDB shard stores (see docs/store-format.md).

The public surface; other packages import only these names.
"""

from typing import TYPE_CHECKING

from shards.convert import ConvertOptions, ConvertSummary, convert
from shards.manifest import Manifest, read_manifest
from shards.storage import StoreError, open_fs
from shards.tarindex import idx_name, idx_spans
from shards.verify import inspect_store, verify

__all__ = [
    "ConvertOptions",
    "ConvertSummary",
    "Manifest",
    "StoreError",
    "convert",
    "idx_name",
    "idx_spans",
    "inspect_store",
    "local_cluster_options",
    "open_fs",
    "read_manifest",
    "verify",
]

if TYPE_CHECKING:  # at run time __getattr__ imports it
    from shards.distributed import local_cluster_options


def __getattr__(name: str) -> object:
    # shards.distributed imports Dask's distributed (a second or two), which only --dask needs
    if name != "local_cluster_options":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from shards import distributed

    return distributed.local_cluster_options
