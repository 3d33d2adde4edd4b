"""A split of a shard store, as the manifest describes it (docs/store-format.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import shards
from pipelines.config import DataError


class RawSample(NamedTuple):
    """One stored sample before decoding: its image bytes and labels."""

    shard: str
    key: str
    ext: str
    image: bytes
    meta: dict  # {"cls": int} | {"boxes": [[cx, cy, w, h]...], "labels": [...]} | {}


class BadSample(NamedTuple):
    """A sample that could not be read; `key` is None when the shard's bytes hid it."""

    shard: str
    key: str | None
    reason: str


@dataclass(frozen=True)
class StoreSplit:
    path: str  # the store, as given
    protocol: str  # fsspec protocol, e.g. "file" or "s3"
    fmt: str  # "wds" | "lmdb"
    layout: str  # "imagefolder" | "unlabeled" | "yolo"
    classes: list[str]
    split: str
    shards: list[str]  # full paths or URLs, manifest order
    counts: list[int]
    sizes: list[int]  # bytes per shard, as the manifest recorded them
    digests: list[str]  # sha256 per shard, as the manifest recorded them
    indexes: list[str | None]  # per shard, the path or URL of its sample index (shards.tarindex), where it has one
    created: str  # when the store was first written (the manifest's `created`): tells a rewritten store apart

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def open_split(path: str, split: str) -> StoreSplit:
    """Describe one split of the store at `path` from its manifest; a one-line DataError if unusable."""
    try:
        manifest = shards.read_manifest(path)
        fs, _ = shards.open_fs(path)
    except shards.StoreError as e:
        raise DataError(str(e)) from None
    if split not in manifest.splits:
        raise DataError(f"{path}: no split {split!r} (the store has: {', '.join(sorted(manifest.splits)) or 'none'})")
    entries = manifest.splits[split].shards
    prefix = path.rstrip("/") + "/"
    return StoreSplit(
        path=path,
        protocol=fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0],
        fmt=manifest.format,
        layout=manifest.layout,
        classes=list(manifest.classes),
        split=split,
        shards=[prefix + s.name for s in entries],
        counts=[s.samples for s in entries],
        sizes=[s.bytes for s in entries],
        digests=[s.sha256 for s in entries],
        indexes=[prefix + shards.idx_name(s.name) if s.idx_sha256 else None for s in entries],
        created=manifest.created,
    )
