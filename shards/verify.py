"""`verify` (every shard against the manifest) and `inspect_store` (the store at a glance)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import statistics
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator

import fsspec
import lmdb
from PIL import Image

from shards.layouts import imagefolder_inputs
from shards.manifest import INDEX_DIR, Manifest, ShardEntry, ShardIndex, load_json, read_manifest, read_rejects
from shards.progress import progress_bar
from shards.storage import is_local, join, open_fs
from shards.tarindex import idx_name, make_idx
from shards.writers import file_digest

IMAGE_EXTS = ("jpg", "png", "webp")
# What `shardtrain verify` ends a failure with: convert trusts the manifest and _index/ and never rewrites a
# finished shard, so neither a rerun nor --append repairs a store.
RECOVER = ("to recover: put the files named above back from a copy of the store, or convert the source again "
           "into a new, empty DEST and point data.path at it (convert does not repair a store in place)")


def verify(dest: str, deep: bool = False, progress: bool = False) -> list[str]:
    """Problems found, each naming its shard; [] means every shard matches the manifest.

    Checks each shard's size, sha256 and sample count, its _index/ file (what --append relies on) and its
    sample index (`.idx`, what readers rely on);
    `deep` also decodes every image and compares the shard's keys with its index's.
    """
    manifest = read_manifest(dest)
    fs, root = open_fs(dest)
    entries = [entry for split in manifest.splits.values() for entry in split.shards]
    problems = []
    with progress_bar(progress, "shards") as bar:
        for entry in bar.track(entries, description="verifying"):
            problems += [f"{entry.name}: {p}" for p in check_shard(fs, root, manifest.format, entry, deep)]
    return problems


def check_shard(fs: fsspec.AbstractFileSystem, root: str, fmt: str, entry: ShardEntry, deep: bool) -> list[str]:
    path = join(root, entry.name)
    if not fs.exists(path):
        return ["missing"]
    index = read_index(fs, root, entry)
    problems = [index] if isinstance(index, str) else []
    keys = []
    with local_copy(fs, path) as local:
        size, sha256 = file_digest(local)
        if size != entry.bytes:
            problems.append(f"size {size} bytes, manifest says {entry.bytes}")
        if sha256 != entry.sha256:
            problems.append(f"sha256 {sha256[:16]}... does not match the manifest's {entry.sha256[:16]}...")
            if fmt == "lmdb":  # mapping a damaged LMDB file can kill the process (SIGBUS): its digest says enough
                return problems
        count = 0
        try:
            for key, ext, image in (read_tar(local) if fmt == "wds" else read_lmdb(local)):
                count += 1
                keys.append(key)
                if deep:
                    problems += [f"sample {key}: {p}" for p in check_image(ext, image)]
        except (tarfile.TarError, lmdb.Error, ValueError, KeyError) as e:
            problems.append(f"unreadable {fmt} shard after {count} samples: {e}")
            return problems
        if count != entry.samples:
            problems.append(f"{count} samples, manifest says {entry.samples}")
        if entry.idx_sha256 is not None:
            problems += check_idx(fs, root, entry, local)
        if deep and isinstance(index, ShardIndex) and keys != [it.key for it in index.items]:
            problems.append(f"its keys differ from {INDEX_DIR}/{entry.name}.json")
    return problems


def check_idx(fs: fsspec.AbstractFileSystem, root: str, entry: ShardEntry, tar_path: str) -> list[str]:
    """Problems with the shard's sample index (shards.tarindex): missing, not what the manifest recorded, or not
    the index of the shard as it is (`tar_path`, a readable tar)."""
    name = idx_name(entry.name)
    try:
        raw = fs.cat_file(join(root, name))
    except FileNotFoundError:
        return [f"{name} is missing"]
    sha256, recorded = hashlib.sha256(raw).hexdigest(), entry.idx_sha256 or ""
    if sha256 != recorded:
        return [f"{name} sha256 {sha256[:16]}... does not match the manifest's {recorded[:16]}..."]
    if raw != make_idx(tar_path):
        return [f"{name} does not index the shard as it is"]
    return []


def read_index(fs: fsspec.AbstractFileSystem, root: str, entry: ShardEntry) -> ShardIndex | str:
    """The shard's index, or the problem with it."""
    where = f"{INDEX_DIR}/{entry.name}.json"
    try:
        raw = fs.cat_file(join(root, INDEX_DIR, f"{entry.name}.json"))
        index = load_json(ShardIndex, raw)
    except FileNotFoundError:
        return f"{where} is missing"
    except (ValueError, OSError) as e:  # bad JSON, bad UTF-8, not an index; or unreadable storage
        return f"{where} is unreadable: {str(e).splitlines()[0]}"
    sha256 = hashlib.sha256(raw).hexdigest()
    if entry.index_sha256 is not None and sha256 != entry.index_sha256:
        return f"{where} sha256 {sha256[:16]}... does not match the manifest's {entry.index_sha256[:16]}..."
    if (index.shard, index.samples, index.bytes, len(index.items)) != (entry.name, entry.samples, entry.bytes,
                                                                       entry.samples):
        return f"{where} does not match the manifest's entry"
    return index


@contextlib.contextmanager
def local_copy(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """A local file path for `path`: itself when local, else a downloaded temp copy."""
    if is_local(fs):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="shardtrain-verify-") as tmp:
        local = os.path.join(tmp, path.rsplit("/", 1)[-1])
        fs.get_file(path, local)
        yield local


def read_tar(path: str) -> Iterator[tuple[str, str | None, bytes | None]]:
    """(key, image extension, image bytes) per sample, grouping adjacent members by key (None: no image)."""
    key: str | None = None
    ext: str | None = None
    image: bytes | None = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            k, _, e = member.name.partition(".")
            if k != key and key is not None:
                yield key, ext, image
                ext, image = None, None
            key = k
            if e in IMAGE_EXTS:
                data = tar.extractfile(member)  # None for a member that is not a file: no image
                ext, image = e, data.read() if data is not None else None
    if key is not None:
        yield key, ext, image


def read_lmdb(path: str) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, image bytes) per sample of an LMDB shard, in index order."""
    env = lmdb.open(path, subdir=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            length = txn.get(b"__len__")
            if length is None:
                raise ValueError("no __len__ record")
            n = int(length)
            for i in range(n):
                record = txn.get(b"%08d" % i)
                if record is None:
                    raise ValueError(f"record {i} of {n} is missing")
                size = int.from_bytes(record[:4], "big")
                header = json.loads(record[4:4 + size])
                yield header["key"], header["ext"], bytes(record[4 + size:])
    finally:
        env.close()


def check_image(ext: str | None, image: bytes | None) -> list[str]:
    if image is None:
        return ["no image member"]
    try:
        with Image.open(io.BytesIO(image)) as img:
            img.load()
    except Exception as e:  # any decode failure is a problem to report, not to raise
        return [f"{ext} does not decode: {e}"]
    return []


def inspect_store(dest: str) -> dict:
    """The store at a glance (what `shardtrain inspect --json` prints)."""
    manifest: Manifest = read_manifest(dest)
    fs, root = open_fs(dest)
    reasons = Counter(r.reason for r in read_rejects(fs, root))
    mixing = classes_per_shard(fs, root, manifest)
    return {
        "format": manifest.format,
        "format_version": manifest.format_version,
        "version": manifest.version,
        "created": manifest.created,
        "updated": manifest.updated,
        "layout": manifest.layout,
        "source": manifest.source,
        "classes": manifest.classes,
        "settings": manifest.settings,
        "order": manifest.order.model_dump(),
        "holdout": manifest.holdout.model_dump() if manifest.holdout else None,
        "rejects": manifest.rejects,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "splits": {
            name: {"samples": s.samples, "shards": len(s.shards), "bytes": s.bytes,
                   "classes_per_shard": mixing.get(name), **({"boxes": s.boxes} if s.boxes is not None else {})}
            for name, s in manifest.splits.items()
        },
        "totals": manifest.totals.model_dump(),
    }


def classes_per_shard(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> dict[str, dict[str, float]]:
    """Per split of a class-folder store, how many classes one shard holds: {"min", "median", "max"}.

    Read from the `_index/` files (each sample's source path names its class folder). A store written
    class by class, as sources are listed, shows 1 or 2; a well-mixed one nearly all its classes.
    """
    if manifest.layout != "imagefolder":
        return {}
    entries = {e.name: split for split, s in manifest.splits.items() for e in s.shards}
    paths = {join(root, INDEX_DIR, f"{name}.json"): name for name in entries}
    if not paths:
        return {}  # a store of rejects only; and fs.cat([]) raises
    found = fs.cat(list(paths), on_error="omit")  # one request per shard, concurrent on S3
    items = {}
    for path, raw in found.items():
        with contextlib.suppress(ValueError):  # a damaged index is verify's to report; its shard is left out here
            items[paths[path]] = load_json(ShardIndex, raw).items
    _, inputs = imagefolder_inputs(sorted({it.path for shard in items.values() for it in shard}))
    cls = {inp.relpath: inp.cls for inp in inputs}
    counts: dict[str, list[int]] = {}
    for name, shard in sorted(items.items()):
        counts.setdefault(entries[name], []).append(len({cls[it.path] for it in shard}))
    return {split: {"min": min(c), "median": statistics.median(c), "max": max(c)} for split, c in counts.items()}
