"""The store's metadata files: manifest.json, _index/<shard>.json, rejects.jsonl, _info.json."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import ClassVar, Literal, TypeVar

import fsspec
from pydantic import BaseModel, SerializerFunctionWrapHandler, ValidationError, field_validator, model_serializer

from shards.storage import StoreError, join, open_fs, shown, storage_error, write_bytes_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
TIMM_INFO = "_info.json"
INDEX_DIR = "_index"

M = TypeVar("M", bound=BaseModel)
_SURROGATE = re.compile("[\ud800-\udfff]")


class Recorded(BaseModel):
    """A model with fields the format gained later that are left out of its JSON where None (`OMIT_IF_NONE`):
    the files of stores without them (other layouts, older stores) stay as they were written."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _recorded_only(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        for name in self.OMIT_IF_NONE:
            if data.get(name, 0) is None:
                del data[name]
        return data


class ShardEntry(Recorded):
    OMIT_IF_NONE = ("boxes",)

    name: str
    samples: int
    bytes: int
    sha256: str
    version: int
    index_sha256: str | None = None  # of _index/<name>.json; None in stores written before it was recorded
    idx_sha256: str | None = None  # of its .idx beside it (shards.tarindex, wds); None: none (lmdb, older stores)
    boxes: int | None = None  # yolo: the boxes its samples hold; None for other layouts and older stores

    @field_validator("name")
    @classmethod
    def _in_the_store(cls, v: str) -> str:
        # readers join it to the store's root: a hand-edited ../ or / would read (and verify) outside the store
        if not v or v in (".", "..") or "/" in v or "\\" in v:
            raise ValueError(f"a shard's name is a file name in the store's folder, not {v!r}")
        return v


class SplitEntry(Recorded):
    OMIT_IF_NONE = ("boxes",)

    samples: int
    bytes: int
    shards: list[ShardEntry]
    boxes: int | None = None  # yolo: the sum of its shards' boxes, where every one of them recorded its count


class Totals(BaseModel):
    samples: int
    bytes: int
    shards: int


class SampleOrder(BaseModel):
    """How a split's samples are ordered across its shards (docs/store-format.md, "Sample order")."""

    rule: Literal["listing", "key-hash"]  # listing: sorted source paths (stores written before the rule was recorded)
    seed: int | None = None  # key-hash: the samples sorted by sha1(f"{seed}:{key}")
    since_version: int = 1  # shards added from this store version on follow `rule`; earlier ones, listing


LISTING_ORDER = SampleOrder(rule="listing")


class Holdout(BaseModel):
    """How a source without split folders was split: `fraction` of its keys went to `split` by `rule`."""

    fraction: float
    split: str
    rule: str


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
    order: SampleOrder = LISTING_ORDER  # absent in stores written before the order was recorded
    holdout: Holdout | None = None  # None: the source's own split folders (or a store from before holdouts)


class RejectRecord(BaseModel):
    """One line of rejects.jsonl. `sha1` (of the source bytes, when readable) lets --append
    tell a file rejected before from one that changed since."""

    path: str
    reason: str
    detail: str
    version: int | None = None
    of: str | None = None
    sha1: str | None = None
    label_sha1: str | None = None  # a yolo `changed` reject's label digest (decode.label_digest)


class IndexItem(Recorded):
    OMIT_IF_NONE = ("label_sha1",)  # indexes of other layouts stay as they were

    key: str
    path: str
    sha1: str
    # yolo: decode.label_digest of its label file, for `changed`; None for other layouts and in stores
    # written before it was recorded, whose labels --append cannot check
    label_sha1: str | None = None


class ShardIndex(Recorded):
    """_index/<shard>.json: written after its shard, so a shard without one is redone."""

    OMIT_IF_NONE = ("boxes",)

    shard: str
    split: str
    version: int
    samples: int
    bytes: int
    sha256: str
    items: list[IndexItem]
    rejects: list[RejectRecord]  # inputs rejected while this shard was being filled
    idx_sha256: str | None = None  # as ShardEntry's
    boxes: int | None = None  # as ShardEntry's

    def entry(self, index_sha256: str) -> ShardEntry:
        return ShardEntry(name=self.shard, samples=self.samples, bytes=self.bytes, sha256=self.sha256,
                          version=self.version, index_sha256=index_sha256, idx_sha256=self.idx_sha256,
                          boxes=self.boxes)


def json_bytes(obj: object, **dumps_kw) -> bytes:
    """UTF-8 JSON of `obj` (json.dumps keywords pass through).

    A file name that is not UTF-8 reaches us surrogate-escaped (os.fsdecode); its lone surrogates
    are written as `\\udcXX` escapes, which json.loads turns back into the very same str.
    """
    text = json.dumps(obj, ensure_ascii=False, **dumps_kw)
    return _SURROGATE.sub(lambda c: f"\\u{ord(c.group()):04x}", text).encode()


def load_json(model: type[M], raw: bytes | str) -> M:
    """`model` from JSON written by json_bytes; pydantic's own JSON parser refuses lone surrogate
    escapes, so the stdlib parses. Raises ValueError (bad JSON, bad UTF-8 or a ValidationError)."""
    return model.model_validate(json.loads(raw))


def first_problem(e: ValidationError) -> str:
    """A metadata file's first validation error in one line: its dotted field, then what is wrong there."""
    first = e.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc']) or '(top)'}: {first['msg']}"


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
    where = shown(fs, path)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise StoreError(f"{shown(fs, root)} is a file, not a shard store (a folder with {MANIFEST})") from None
    except Exception as e:  # storage: permissions, the network, credentials
        raise StoreError(f"cannot read {where}: {storage_error(e)}") from None
    try:
        manifest = load_json(Manifest, raw)
    except ValidationError as e:
        raise StoreError(f"{where} is not a valid manifest: {first_problem(e)}") from None
    except ValueError as e:
        raise StoreError(f"{where} is not valid JSON: {e}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise StoreError(f"{where} has format_version {manifest.format_version}; "
                         f"this shardtrain reads {FORMAT_VERSION}")
    return manifest


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    write_bytes_atomic(fs, join(root, MANIFEST), json_bytes(manifest.model_dump(), indent=2))


def read_indexes(fs: fsspec.AbstractFileSystem, root: str,
                 manifest: Manifest | None = None) -> dict[str, ShardIndex]:
    """Every shard index in the store, by shard name; with `manifest`, each index of a shard it lists
    must be there and match its recorded `index_sha256`.

    A damaged one is refused, not skipped: --append would add that shard's inputs a second time, or
    take a changed one's word for what is stored. Writes are atomic, so a kill never leaves one
    half-written; damage comes from outside.
    """
    entries = [s for split in manifest.splits.values() for s in split.shards] if manifest else []
    recorded = {s.name: s.index_sha256 for s in entries}
    folder = join(root, INDEX_DIR)
    paths = sorted(p for p in fs.find(folder) if p.endswith(".json")) if fs.isdir(folder) else []
    indexes = {}
    for path in paths:
        shard = path.rsplit("/", 1)[1].removesuffix(".json")
        raw = fs.cat_file(path)
        try:
            index = load_json(ShardIndex, raw)
            problem = None if index.shard == shard else f"is damaged (it names shard {index.shard})"
        except ValueError as e:
            problem = f"is damaged ({str(e).splitlines()[0]})"
        if problem is None and recorded.get(shard) and hashlib.sha256(raw).hexdigest() != recorded[shard]:
            problem = "does not match the manifest's index_sha256"
        if problem:
            raise bad_index(shown(fs, path), shard, problem)
        indexes[shard] = index
    missing = sorted(set(recorded) - set(indexes))
    if missing:
        raise bad_index(shown(fs, join(folder, f"{missing[0]}.json")), missing[0], "is missing")
    return indexes


def bad_index(path: str, shard: str, problem: str) -> StoreError:
    return StoreError(f"{path} {problem}, so which inputs shard {shard} holds is unknown: "
                      "run `shardtrain verify` on the store, and reconvert into an empty DEST")


def index_sha256(fs: fsspec.AbstractFileSystem, root: str, shard: str) -> str:
    """The sha256 of `_index/<shard>.json` as stored (what the manifest's `index_sha256` records)."""
    return hashlib.sha256(fs.cat_file(join(root, INDEX_DIR, f"{shard}.json"))).hexdigest()


def write_index(fs: fsspec.AbstractFileSystem, root: str, index: ShardIndex) -> None:
    write_bytes_atomic(fs, join(root, INDEX_DIR, f"{index.shard}.json"),
                       json_bytes(index.model_dump(), separators=(",", ":")))


def read_rejects(fs: fsspec.AbstractFileSystem, root: str) -> list[RejectRecord]:
    """The store's reject records; StoreError naming the file and line where one is not a record (a hand edit)."""
    path = join(root, REJECTS)
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        return []
    except UnicodeDecodeError as e:
        raise StoreError(f"{shown(fs, path)} is not UTF-8 text (byte {e.start})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(load_json(RejectRecord, line))
        except ValidationError as e:
            raise StoreError(f"{shown(fs, path)} line {number} is not a reject record: {first_problem(e)}") from None
        except ValueError as e:
            raise StoreError(f"{shown(fs, path)} line {number} is not valid JSON: {e}") from None
    return records


def write_rejects(fs: fsspec.AbstractFileSystem, root: str, rejects: list[RejectRecord]) -> None:
    lines = (json_bytes(r.model_dump(exclude_none=True)) + b"\n" for r in rejects)
    write_bytes_atomic(fs, join(root, REJECTS), b"".join(lines))


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
