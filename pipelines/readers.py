"""Random access to the samples of a split's shards: WebDataset tars and LMDB environments.

Both readers open files lazily in the process that reads (a DataLoader worker), never in
the parent, so forked and persistent workers are safe; a reader that finds itself in a
new process drops what the parent had open.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

import fsspec
import numpy as np

from pipelines.config import DataError
from pipelines.plan import shard_starts
from pipelines.store import BadSample, RawSample, StoreSplit
from shards import idx_spans
from shards.storage import storage_error

if TYPE_CHECKING:
    import lmdb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
READ_BLOCK = 4 << 20  # fsspec readahead while scanning a remote shard's headers
OPEN_FILES = 256  # local shard descriptors a process keeps: a shuffle block spans many shards
CACHE_NOTE = "store.json"  # in a store's folder of a shard cache: {"url", "created"} of the store


class TarIndex(NamedTuple):
    spans: np.ndarray  # (n, 2) int64: each sample's byte range, its members' headers and data
    error: str | None  # why the scan stopped before the manifest's count, if it did


def scan_tar(fileobj, expected: int) -> TarIndex:
    """Walk the tar headers (member data is seeked over, not read) and note where each
    sample's adjacent members begin and end: 16 bytes a sample, so a worker can keep the
    index of every shard it meets."""
    spans: list[list[int]] = []
    last_key, error = None, None
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key = os.path.basename(info.name).partition(".")[0]
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if key != last_key:
                    spans.append([info.offset, end])
                    last_key = key
                else:
                    spans[-1][1] = end
    except (tarfile.TarError, EOFError) as e:  # corrupt bytes; an OSError (storage) propagates
        error = f"{type(e).__name__}: {e}"
    if len(spans) < expected and error is None:
        error = f"tar ends after {len(spans)} of {expected} samples"
    return TarIndex(np.asarray(spans, dtype=np.int64).reshape(-1, 2), error)


def parse_sample(chunk: bytes) -> tuple[str, dict[str, bytes]]:
    """Key and members (extension -> bytes) of one sample from its span of the tar.

    Plain ustar headers of regular files (what our keys always give) are read in place:
    name, size and type are all a reader needs. Anything else (pax or GNU long-name
    headers) goes through tarfile, which costs ~0.15 ms a sample.
    """
    key, members, pos = "", {}, 0
    block = tarfile.BLOCKSIZE
    while pos + block <= len(chunk):
        header = chunk[pos : pos + block]
        if header[156:157] not in (b"0", b"\0") or header[124] & 0x80:
            return parse_sample_with_tarfile(chunk)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        key, _, ext = name.rpartition("/")[2].partition(".")
        members[ext.lower()] = chunk[pos + block : pos + block + size]
        pos += block + -(-size // block) * block
    return key, members


def parse_sample_with_tarfile(chunk: bytes) -> tuple[str, dict[str, bytes]]:
    key, members = "", {}
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                key, _, ext = os.path.basename(info.name).partition(".")
                members[ext.lower()] = tar.extractfile(info).read()  # type: ignore[union-attr]  # a file's reader
    return key, members


def parse_meta(members: dict[str, bytes]) -> dict:
    meta: dict = {}
    if "cls" in members:
        meta["cls"] = int(members["cls"].decode())
    if "json" in members:
        meta.update(json.loads(members["json"]))
    return meta


class ShardReader:
    """Common part: map global sample numbers to (shard, index within it)."""

    def __init__(self, split: StoreSplit):
        self.split = split
        self.starts = shard_starts(split.counts)
        self._pid = -1

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._reset()

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index within that shard) of each global sample number."""
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        return shards, indices - self.starts[shards]

    def read(self, indices: np.ndarray) -> list[RawSample | BadSample]:
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget what the parent process had open."""


class ByteRanges:
    """Reads byte ranges of shard files in one call per batch.

    Local and mounted files: `os.pread` on descriptors kept open (about 1.5 us a read here, against
    55-90 us through fsspec's cat_file/cat_ranges, which open the file each time). Other filesystems:
    fsspec's `cat_ranges`, whose requests run concurrently on S3, so a batch spread over many shards
    costs about one round trip rather than one per sample.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, local: bool):
        self.fs, self.local = fs, local
        self.fds: OrderedDict[str, int] = OrderedDict()

    def fetch(self, paths: list[str], starts: list[int], ends: list[int]) -> list[bytes | Exception]:
        """The bytes [start, end) of each path, or the error that storage gave for it (an OSError, or a
        backend's own type such as botocore's EndpointConnectionError)."""
        if not self.local:
            return self.fs.cat_ranges(paths, starts, ends, on_error="return")
        out: list[bytes | Exception] = []
        for path, start, end in zip(paths, starts, ends):
            try:
                out.append(os.pread(self._fd(path), end - start, start))
            except OSError as e:
                out.append(e)
        return out

    def _fd(self, path: str) -> int:
        if path in self.fds:
            self.fds.move_to_end(path)
            return self.fds[path]
        if len(self.fds) >= OPEN_FILES:
            os.close(self.fds.popitem(last=False)[1])
        self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]


class TarReader(ShardReader):
    """WebDataset tars from a local path, NAS or any fsspec URL, read by byte range.

    The first touch of a shard in a worker reads its sample index (the `.idx` convert writes beside it: one
    small read) or, for a shard without one, scans its headers (on object storage, reading the whole shard);
    the index is kept for later epochs (persistent workers). A batch is then one `ByteRanges.fetch` of its
    samples' spans, whichever shards they are in. With `cache_dir`, a remote store's shard is first copied
    whole into it (`local_copy`), and read there from then on.
    """

    def __init__(self, split: StoreSplit, cache_dir: str | None = None):
        super().__init__(split)
        self.paths = [fsspec.core.url_to_fs(url)[1] for url in split.shards]
        self.idx_paths = [fsspec.core.url_to_fs(url)[1] if url else None for url in split.indexes]
        self.names = [os.path.basename(p) for p in self.paths]
        local = split.protocol in ("file", "local")
        self.cache = None if local or cache_dir is None else store_cache(cache_dir, split)

    def _reset(self) -> None:
        # made in the reading process: neither the parent's descriptors nor its async S3 client survive a fork
        self.fs = fsspec.core.url_to_fs(self.split.path)[0]
        self._index: dict[int, TarIndex] = {}
        self._read_paths = list(self.paths)  # a cached shard's entry becomes its local copy's path
        if self.cache is None:
            self._ranges = ByteRanges(self.fs, local=self.split.protocol in ("file", "local"))
        else:
            self._ranges = ByteRanges(fsspec.filesystem("file"), local=True)

    def read(self, indices: np.ndarray) -> list[RawSample | BadSample]:
        self._check_process()
        shards, local = self.locate(indices)
        out: list[RawSample | BadSample | None] = [None] * len(indices)
        wanted: list[tuple[int, int, int, int]] = []  # (position, shard, start, end)
        for pos, (shard, i) in enumerate(zip(shards.tolist(), local.tolist())):
            index = self._shard_index(shard)
            if i >= len(index.spans):
                out[pos] = BadSample(self.names[shard], None, f"sample #{i} unreachable: {index.error}")
            else:
                wanted.append((pos, shard, *index.spans[i].tolist()))
        chunks = self._ranges.fetch([self._read_paths[w[1]] for w in wanted], [w[2] for w in wanted],
                                    [w[3] for w in wanted])
        for (pos, shard, _, _), chunk in zip(wanted, chunks):
            if isinstance(chunk, Exception):  # storage failed: not a corrupt sample, so never skipped
                raise self._storage_error(shard, chunk)
            out[pos] = self._parse(shard, int(local[pos]), chunk)
        return out  # type: ignore[return-value]  # every slot is filled above

    def _storage_error(self, shard: int, e: Exception) -> DataError:
        return DataError(f"cannot read shard {self.split.shards[shard]}: {storage_error(e)}")

    def _shard_index(self, shard: int) -> TarIndex:
        if shard not in self._index:
            try:
                if self.cache is not None:
                    self._read_paths[shard] = self.local_copy(shard)
                self._index[shard] = self._read_idx(shard) or self._scan(shard)
            except Exception as e:  # as in `read`: storage, not data
                raise self._storage_error(shard, e) from None
        return self._index[shard]

    def _read_idx(self, shard: int) -> TarIndex | None:
        """The shard's index from its `.idx` file; None without one, or with one that is missing or does not fit
        the shard (the scan finds the samples then, and `shardtrain verify` names the file)."""
        path = self.idx_paths[shard]
        if path is None:
            return None
        try:
            spans = idx_spans(self.fs.cat_file(path), self.split.counts[shard], self.split.sizes[shard])
        except (FileNotFoundError, ValueError):
            return None
        return TarIndex(np.asarray(spans, dtype=np.int64).reshape(-1, 2), None)

    def _scan(self, shard: int) -> TarIndex:
        with self._ranges.fs.open(self._read_paths[shard], "rb", block_size=READ_BLOCK) as f:
            return scan_tar(f, self.split.counts[shard])

    def local_copy(self, shard: int) -> str:
        """The path of the shard's copy in the cache, downloaded whole (one request) unless a copy of the
        manifest's size is there already, from another worker or an earlier run."""
        assert self.cache is not None
        # named by content too: a store rewritten within the second of its `created` shares the folder
        path = os.path.join(self.cache, f"{self.split.digests[shard][:16]}-{self.names[shard]}")
        if not os.path.exists(path) or os.path.getsize(path) != self.split.sizes[shard]:
            part = f"{path}.{os.getpid()}.{threading.get_ident()}.part"  # another thread may fetch it too
            try:
                self.fs.get_file(self.paths[shard], part)
            except BaseException:  # an outage or a full disk leaves no partial copy behind
                with contextlib.suppress(FileNotFoundError):
                    os.remove(part)
                raise
            os.replace(part, path)  # whole or absent, for the workers that may open it at any moment
            for entry in os.scandir(self.cache):  # the copy of a rewritten store's shard of this name
                if entry.name.endswith(f"-{self.names[shard]}") and entry.path != path:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(entry.path)
        return path

    def _parse(self, shard: int, i: int, chunk: bytes) -> RawSample | BadSample:
        name = self.names[shard]
        try:
            key, data = parse_sample(chunk)
        except (tarfile.TarError, ValueError) as e:
            return BadSample(name, None, f"sample #{i}: bad tar header: {e}")
        image_ext = next((e for e in IMAGE_EXTS if e in data), None)
        if image_ext is None:
            return BadSample(name, key, f"no image member among {sorted(data)}")
        try:
            return RawSample(name, key, image_ext, data[image_ext], parse_meta(data))
        except ValueError as e:  # a bad .cls or .json member
            return BadSample(name, key, f"bad label: {e}")


class LmdbReader(ShardReader):
    """Single-file LMDB environments on a local (or mounted NAS) path."""

    def __init__(self, split: StoreSplit):
        if split.protocol not in ("file", "local"):
            raise DataError(
                f"{split.path}: LMDB stores must be on a local or mounted path (LMDB maps files into memory); "
                f"copy it first, e.g. `aws s3 sync {split.path} /data/store`, and set data.path to the copy"
            )
        super().__init__(split)

    def read(self, indices: np.ndarray) -> list[RawSample | BadSample]:
        self._check_process()
        shards, local = self.locate(indices)
        out: list[RawSample | BadSample | None] = [None] * len(indices)
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            order = np.argsort(local[where], kind="stable")  # ascending keys: neighbouring pages
            got = self._read_shard(int(shard), local[where][order].tolist())
            for pos, sample in zip(where[order], got):
                out[pos] = sample
        return out  # type: ignore[return-value]  # every slot is filled above

    def _read_shard(self, shard: int, local: list[int]) -> list[RawSample | BadSample]:
        name = os.path.basename(self.split.shards[shard])
        path = fsspec.core.url_to_fs(self.split.shards[shard])[1]
        out: list[RawSample | BadSample] = []
        size = os.path.getsize(path) if os.path.exists(path) else None
        if size != self.split.sizes[shard]:  # a short file maps pages that do not exist: SIGBUS, not an error
            reason = f"the file is {size} bytes, the manifest says {self.split.sizes[shard]} (run shardtrain verify)"
            return [BadSample(name, None, f"sample #{i}: cannot open: {reason}") for i in local]
        try:
            env = open_env(path)
        except Exception as e:  # lmdb.Error and OSError: the whole shard is unreadable
            return [BadSample(name, None, f"sample #{i}: cannot open: {e}") for i in local]
        with env.begin(buffers=False) as txn:
            for i in local:
                value = txn.get(b"%08d" % i)
                if value is None:
                    out.append(BadSample(name, None, f"sample #{i}: key {i:08d} missing"))
                    continue
                out.append(parse_lmdb_value(name, i, value))
        return out


_ENVS: dict[str, lmdb.Environment] = {}
_ENVS_LOCK = threading.Lock()


def open_env(path: str):
    """The process's one environment for `path`: LMDB allows only one per file and process. Under a lock: two
    threads reading a shard for the first time (gpu decode's thread with workers=0, and an eval loop) would both
    open it, and the second open fails ("already open in this process")."""
    import lmdb

    with _ENVS_LOCK:
        if path not in _ENVS:
            _ENVS[path] = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False)
        return _ENVS[path]


def forget_envs_after_fork() -> None:
    """A forked child (a DataLoader worker) must not use its parent's environments, nor a lock the fork may have
    caught held by another thread."""
    global _ENVS_LOCK
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()
    _ENVS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=forget_envs_after_fork)


def parse_lmdb_value(shard: str, i: int, value: bytes) -> RawSample | BadSample:
    try:
        (length,) = struct.unpack(">I", value[:4])
        meta = json.loads(value[4 : 4 + length])
    except (struct.error, ValueError) as e:
        return BadSample(shard, None, f"sample #{i}: bad header: {e}")
    key, ext = meta.pop("key", f"#{i}"), meta.pop("ext", "jpg")
    return RawSample(shard, key, ext, value[4 + length :], meta)


def store_key(split: StoreSplit) -> str:
    """A store's folder in a shard cache: its URL and creation time, so a store rewritten at the same URL gets a
    new folder."""
    return hashlib.sha1(f"{split.path}\n{split.created}".encode()).hexdigest()[:16]


def store_cache(cache_dir: str, split: StoreSplit) -> str:
    """The store's folder in the shard cache, made with a note of the store's URL and creation time (`CACHE_NOTE`).
    The folders of earlier stores at that URL go: a store is rewritten only into an empty DEST (convert appends
    keep `created`), so no reader can use their copies again, and each would hold a whole store's shards."""
    folder = os.path.join(cache_dir, store_key(split))
    os.makedirs(folder, exist_ok=True)
    note = {"url": split.path, "created": split.created}
    if not os.path.exists(os.path.join(folder, CACHE_NOTE)):
        part = os.path.join(folder, f"{CACHE_NOTE}.{os.getpid()}.part")
        with open(part, "w") as f:
            json.dump(note, f)
        os.replace(part, os.path.join(folder, CACHE_NOTE))
    for entry in os.scandir(cache_dir):
        if entry.path != folder and cache_note(entry.path).get("url") == split.path:
            shutil.rmtree(entry.path, ignore_errors=True)  # another rank of this host may be removing it too
    return folder


def cache_note(folder: str) -> dict:
    """A cache folder's note; {} for what is not a store's folder (or one from before the notes)."""
    try:
        with open(os.path.join(folder, CACHE_NOTE)) as f:
            note = json.load(f)
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def make_reader(split: StoreSplit, cache_dir: str | None = None) -> ShardReader:
    if split.fmt == "wds":
        return TarReader(split, cache_dir)
    if split.fmt == "lmdb":
        return LmdbReader(split)
    raise DataError(f"{split.path}: unknown store format {split.fmt!r} (expected wds or lmdb)")
