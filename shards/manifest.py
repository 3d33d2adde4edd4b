"""The store's metadata files: manifest.json, _index/<shard>.json, rejects.jsonl, _info.json."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import fsspec
from pydantic import BaseModel, ValidationError

from shards.storage import StoreError, join, open_fs, write_bytes_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
TIMM_INFO = "_info.json"
INDEX_DIR = "_index"


class ShardEntry(BaseModel):
    name: str
    samples: int
    bytes: int
    sha256: str
    version: int


class SplitEntry(BaseModel):
    samples: int
    bytes: int
    shards: list[ShardEntry]


class Totals(BaseModel):
    samples: int
    bytes: int
    shards: int


class Manifest(BaseModel):
    """manifest.json, as docs/store-format.md describes it."""

    format: str
    format_version: int
    version: int
    created: str
    updated: str
    layout: str
    classes: list[str]
    source: str
    settings: dict
    rejects: int
    splits: dict[str, SplitEntry]
    totals: Totals


class RejectRecord(BaseModel):
    """One line of rejects.jsonl. `sha1` (of the source bytes, when readable) lets --append
    tell a file rejected before from one that changed since."""

    path: str
    reason: str
    detail: str
    version: int | None = None
    of: str | None = None
    sha1: str | None = None


class IndexItem(BaseModel):
    key: str
    path: str
    sha1: str


class ShardIndex(BaseModel):
    """_index/<shard>.json: written after its shard, so a shard without one is redone."""

    shard: str
    split: str
    version: int
    samples: int
    bytes: int
    sha256: str
    items: list[IndexItem]
    rejects: list[RejectRecord]  # inputs rejected while this shard was being filled

    def entry(self) -> ShardEntry:
        return ShardEntry(name=self.shard, samples=self.samples, bytes=self.bytes, sha256=self.sha256,
                          version=self.version)


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_manifest(dest: str) -> Manifest:
    """The manifest of the store at `dest`; StoreError if there is none or it is unreadable."""
    fs, root = open_fs(dest)
    manifest = load_manifest(fs, root)
    if manifest is None:
        raise StoreError(f"no shard store at {dest} (no {MANIFEST})")
    return manifest


def load_manifest(fs: fsspec.AbstractFileSystem, root: str) -> Manifest | None:
    path = join(root, MANIFEST)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e}") from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise StoreError(f"{path} is not a valid manifest: {where}: {first['msg']}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise StoreError(f"{path} has format_version {manifest.format_version}; this shardtrain reads {FORMAT_VERSION}")
    return manifest


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    write_bytes_atomic(fs, join(root, MANIFEST), manifest.model_dump_json(indent=2).encode())


def read_indexes(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, ShardIndex]:
    """Every shard index in the store, by shard name (unreadable ones are left out: redone)."""
    folder = join(root, INDEX_DIR)
    if not fs.isdir(folder):
        return {}
    indexes = {}
    for path in sorted(fs.find(folder)):
        if not path.endswith(".json"):
            continue
        try:
            index = ShardIndex.model_validate_json(fs.cat_file(path))
        except (ValidationError, OSError):
            continue
        indexes[index.shard] = index
    return indexes


def write_index(fs: fsspec.AbstractFileSystem, root: str, index: ShardIndex) -> None:
    write_bytes_atomic(fs, join(root, INDEX_DIR, f"{index.shard}.json"), index.model_dump_json().encode())


def read_rejects(fs: fsspec.AbstractFileSystem, root: str) -> list[RejectRecord]:
    try:
        text = fs.cat_file(join(root, REJECTS)).decode()
    except FileNotFoundError:
        return []
    return [RejectRecord.model_validate_json(line) for line in text.splitlines() if line.strip()]


def write_rejects(fs: fsspec.AbstractFileSystem, root: str, rejects: list[RejectRecord]) -> None:
    lines = (json.dumps(r.model_dump(exclude_none=True), ensure_ascii=False) + "\n" for r in rejects)
    write_bytes_atomic(fs, join(root, REJECTS), "".join(lines).encode())


def timm_info(name: str, manifest: Manifest) -> dict:
    """The table timm's `wds/` reader loads (timm/data/readers/reader_wds.py `_parse_split_info`)."""
    return {
        "name": name,
        "splits": {
            split: {
                "name": split,
                "num_samples": entry.samples,
                "filenames": [s.name for s in entry.shards],
                "shard_lengths": [s.samples for s in entry.shards],
            }
            for split, entry in manifest.splits.items()
        },
    }


def write_timm_info(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    name = root.rstrip("/").rsplit("/", 1)[-1]
    write_bytes_atomic(fs, join(root, TIMM_INFO), json.dumps(timm_info(name, manifest), indent=2).encode())
