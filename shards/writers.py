"""Writing one shard file (WebDataset tar or single-file LMDB) from packed samples."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import lmdb

from shards.decode import Sample

SUFFIX = {"wds": "tar", "lmdb": "lmdb"}


def shard_name(split: str, number: int, fmt: str) -> str:
    return f"{split}-{number:06d}.{SUFFIX[fmt]}"


def payload_bytes(nbytes: int) -> int:
    """What a sample of `nbytes` image bytes adds to a shard, for byte-sized shards (members plus their tar headers)."""
    return nbytes + 1024


def meta_members(sample: Sample) -> dict[str, bytes]:
    """The label members of a WebDataset sample: `cls` for classes, `json` for boxes."""
    if "cls" in sample.meta:
        return {"cls": str(sample.meta["cls"]).encode()}
    if "boxes" in sample.meta:
        return {"json": json.dumps(sample.meta, separators=(",", ":")).encode()}
    return {}


def write_wds(path: str, samples: Sequence[Sample]) -> None:
    """A plain USTAR tar with fixed mtime/owner, so equal samples give byte-identical shards."""
    import webdataset as wds  # here, not at the top: the package imports torch (seconds), convert alone needs it

    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tar:
        for s in samples:
            tar.write({"__key__": s.input.key, s.ext: s.image, **meta_members(s)})


def lmdb_record(sample: Sample) -> bytes:
    """4-byte big-endian header length, the UTF-8 JSON header, then the image bytes."""
    header = json.dumps({"key": sample.input.key, "ext": sample.ext, **sample.meta}, separators=(",", ":")).encode()
    return len(header).to_bytes(4, "big") + header + sample.image


def write_lmdb(path: str, samples: Sequence[Sample]) -> None:
    """One write transaction into a fresh single-file environment (deterministic bytes)."""
    records = [lmdb_record(s) for s in samples]
    # Only address space: the file grows with the pages actually written.
    map_size = 2 * sum(len(r) + 8192 for r in records) + (64 << 20)
    env = lmdb.open(path, subdir=False, map_size=map_size, lock=False, meminit=True, sync=True)
    try:
        with env.begin(write=True) as txn:
            for i, record in enumerate(records):
                txn.put(b"%08d" % i, record)
            txn.put(b"__len__", str(len(records)).encode())
    finally:
        env.close()


WRITERS = {"wds": write_wds, "lmdb": write_lmdb}


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a local file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return os.path.getsize(path), h.hexdigest()
