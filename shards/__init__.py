"""Raw image folders to verified WebDataset or LMDB shard stores (see docs/store-format.md).

The public surface; other packages import only these names.
"""

from shards.convert import ConvertOptions, ConvertSummary, convert
from shards.manifest import Manifest, read_manifest
from shards.storage import StoreError, open_fs
from shards.verify import inspect_store, verify

__all__ = [
    "ConvertOptions",
    "ConvertSummary",
    "Manifest",
    "StoreError",
    "convert",
    "inspect_store",
    "open_fs",
    "read_manifest",
    "verify",
]
