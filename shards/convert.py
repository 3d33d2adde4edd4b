"""`convert`: a raw folder to a shard store (docs/store-format.md), resumable and appendable.

Workers decode inputs in parallel; the parent packs their results into shards in input
order, so the shards are the same whatever the worker count. Each shard is written under a
temporary name and renamed (or uploaded in one PUT), then its `_index/` entry is written; a
rerun after a kill skips the inputs that finished shards already cover. manifest.json last.
With `--dask`, shards.distributed does the decoding and writing on a Dask cluster, and this
module does the rest (listing, packing, the indexes and the manifest) the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Literal, Protocol, cast

import fsspec
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.markup import escape

from shards.decode import EMPTY_LABEL, Digest, Reject, Result, Sample, Settings, process
from shards.keys import order_key, sample_key
from shards.layouts import HOLDOUT_RULE, HOLDOUT_SPLIT, Input, Listing, list_source, with_holdout
from shards.manifest import (
    FORMAT_VERSION,
    INDEX_DIR,
    MANIFEST,
    REJECTS,
    TIMM_INFO,
    Holdout,
    IndexItem,
    Manifest,
    RejectRecord,
    SampleOrder,
    ShardEntry,
    ShardIndex,
    SplitEntry,
    Totals,
    index_sha256,
    load_manifest,
    now_utc,
    read_indexes,
    read_rejects,
    write_index,
    write_manifest,
    write_rejects,
    write_timm_info,
)
from shards.progress import console, progress_bar
from shards.storage import (
    WRITE_PROBE,
    StoreError,
    check_writable,
    is_local,
    join,
    open_fs,
    public_url,
    publish_file,
    write_bytes_atomic,
)
from shards.tarindex import idx_name, make_idx
from shards.workers import WorkerDied, ordered_map
from shards.writers import SUFFIX, WRITERS, file_digest, payload_bytes, shard_name

if TYPE_CHECKING:
    from distributed import Client

_SIZE = re.compile(r"^\s*(\d+)\s*(samples?|[KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
# What a conversion leaves in DEST before its manifest.json: shards, their .idx and _index/, shards being built
# (.NAME.partial), the files commit() writes before the manifest, temp files of atomic writes, the write probe.
_OUR_FILES = {INDEX_DIR, REJECTS, TIMM_INFO, MANIFEST, WRITE_PROBE}
_SHARD_FILE = re.compile(rf"^\.?.+-\d{{6}}\.({'|'.join([*SUFFIX.values(), 'idx'])})(\.partial)?$")
_DASK = re.compile(r"^(local:[1-9]\d*|[a-z]+://\S+)$")


@dataclass(frozen=True)
class ShardLimit:
    max_bytes: int | None = None
    max_samples: int | None = None

    def full(self, samples: int, nbytes: int, incoming: int) -> bool:
        """Whether a shard holding `samples`/`nbytes` must be closed before adding `incoming` bytes."""
        if self.max_samples is not None:
            return samples >= self.max_samples
        assert self.max_bytes is not None  # parse_shard_size sets one of the two
        return samples > 0 and nbytes + incoming > self.max_bytes


def parse_shard_size(text: str) -> ShardLimit:
    """"256MB", "1GB", "500KB", "64MiB" (bytes) or "1000" / "1000samples" (samples per shard)."""
    m = _SIZE.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"shard size {text!r} is not like 256MB, 1GB, 500KB or 1000samples")
    n, unit = int(m.group(1)), (m.group(2) or "").upper()
    if unit == "" or unit.startswith("SAMPLE"):
        return ShardLimit(max_samples=n)
    return ShardLimit(max_bytes=n * _UNITS[unit.removesuffix("B") or "B"])


class ConvertOptions(BaseModel):
    """What `shardtrain convert` takes; also the Prefect flow's parameter model."""

    model_config = ConfigDict(extra="forbid")

    src: str
    dest: str
    format: Literal["wds", "lmdb"] = "wds"
    layout: Literal["auto", "imagefolder", "unlabeled", "yolo"] = "auto"
    shard_size: str = "256MB"
    workers: int = Field(default=os.cpu_count() or 1, ge=1)
    max_side: int | None = Field(default=None, ge=1)
    max_pixels: int = Field(default=89_478_485, ge=1)  # PIL's own decompression-bomb limit
    append: bool = False
    on_error: Literal["skip", "fail"] = "skip"
    seed: int = 0  # of the samples' pseudo-random order in the shards (shards.keys.order_key)
    # Share of a source without split folders held out as val (None: 0.05 for a new store, the store's own
    # on --append); refused above 0 for a source with split folders.
    val_fraction: float | None = Field(default=None, ge=0, lt=1)
    # A Dask scheduler's address (tcp://HOST:8786) or local:N (a LocalCluster of N processes) to decode and
    # write on, instead of `workers` processes here: shards.distributed.
    dask: str | None = None

    @field_validator("src", "dest")
    @classmethod
    def _given(cls, v: str) -> str:
        if not v:  # "" would be the current folder
            raise ValueError("is empty (an unset shell variable?)")
        return v

    @field_validator("shard_size")
    @classmethod
    def _valid_shard_size(cls, v: str) -> str:
        parse_shard_size(v)
        return v

    @field_validator("dask")
    @classmethod
    def _valid_dask(cls, v: str | None) -> str | None:
        if v is not None and not _DASK.match(v):
            raise ValueError(f"{v!r} is neither a scheduler address like tcp://HOST:8786 nor local:N")
        return v


class ConvertSummary(BaseModel):
    layout: str
    format: str
    version: int  # the store's version after this run
    added: int  # samples added to the store by this run (a resumed run counts its earlier shards)
    rejected: int  # new rejects recorded by this run
    rejected_by_reason: dict[str, int] = {}  # this run's new rejects by reason (`inspect` counts the store's)
    unchanged: int  # inputs already in the store (or already rejected with the same content)
    shards_written: list[str]  # shards this run added to the store
    splits: dict[str, int]  # samples per split in the whole store
    skipped: list[str] = []  # what SRC holds and was not read, each "relpath: why" (shards.layouts.Listing)
    untrained_classes: list[str] = []  # imagefolder: a line for each class without a train image (Listing's)
    # imagefolder: a line for each class with train images, none of them stored (`rejected_classes`)
    rejected_classes: list[str] = []
    boxes: dict[str, int] = {}  # yolo: boxes per split in the whole store, where recorded (manifest's `boxes`)
    # yolo: per split of SRC, the folders its label files were looked for in (shards.layouts.Listing.label_folders)
    label_folders: dict[str, list[str]] = {}
    # yolo: the folders labels/NAME/ with .txt files that match no split of images/ (shards.layouts.Listing)
    unmatched_label_folders: list[str] = []

    def boxless_splits(self) -> list[str]:
        """A line for each yolo split without a single box: stored, but no detector can use it."""
        return [f"split {name} holds no boxes: none of its {self.splits[name]} images has a label line"
                f"{self.where_labels(name)}; a detector learns nothing from it and cannot be evaluated on it"
                for name, n in self.boxes.items() if n == 0]

    def kept_changes(self) -> str | None:
        """A line for this run's `changed` rejects, which a count of rejects hides: each is a stored sample that
        --append kept as it was, the source's change not taken."""
        n = self.rejected_by_reason.get("changed", 0)
        if not n:
            return None
        counted = "1 stored sample changed in SRC and was" if n == 1 else f"{n} stored samples changed in SRC and were"
        return f"{counted} kept as stored: to take the changes, {TAKE_A_CHANGE}"

    def where_labels(self, split: str) -> str:
        """Where `split`'s label files were looked for, in parentheses, with the label folders matching no split
        of images/, as its labels may be in one of them under another name (labels/valid/ beside images/val/);
        "" for a split SRC no longer has (an earlier run's, on --append)."""
        looked = self.label_folders.get(split)
        if not looked:
            return ""
        text = "looked in " + " and ".join(looked)
        others = self.unmatched_label_folders
        if others:
            which = "which is no split" if len(others) == 1 else "which are no splits"
            text += f"; labels/ also has {', '.join(name + '/' for name in others)}, {which} of images/"
        return f" ({text})"


class Packable(Protocol):
    """What packing needs of a decoded sample: a decode.Sample, or (on a Dask client) a
    shards.distributed.SampleRef to one that stays on a worker."""

    @property
    def input(self) -> Input: ...
    @property
    def sha1(self) -> str: ...
    @property
    def nbytes(self) -> int: ...


@dataclass
class OpenShard:
    """The shard being filled for one split, with the rejects met while filling it."""

    split: str
    number: int
    samples: list[Packable] = field(default_factory=list)
    nbytes: int = 0
    rejects: list[RejectRecord] = field(default_factory=list)


@dataclass
class StoreState:
    """What is already in DEST: the committed store and the finished shards of an interrupted run."""

    manifest: Manifest | None
    committed: dict[str, ShardIndex]
    resumed: dict[str, ShardIndex]
    old_rejects: list[RejectRecord]

    @property
    def version(self) -> int:
        return self.manifest.version + 1 if self.manifest else 1


def convert(opts: ConvertOptions, progress: bool = True, client: Client | None = None) -> ConvertSummary:
    """Convert `opts.src` into the store at `opts.dest`; see the module docstring. With `client` (a Dask
    client, as a task on a Dask cluster has) or `opts.dask`, the decoding and writing run on that cluster."""
    src_fs, src_root = open_fs(opts.src)
    fs, root = open_fs(opts.dest)
    check_dest(fs, root, opts.dest)
    manifest = load_manifest(fs, root)
    if manifest is not None:
        check_format(manifest, opts)
    listing = list_source(src_fs, src_root, opts.layout)
    if manifest is not None and not opts.append:
        val_fraction(opts, manifest)  # another holdout than the store's is no rerun of its conversion
        if not same_conversion(fs, root, manifest, opts, listing):
            raise StoreError(f"{public_url(opts.dest)} already holds a store (version {manifest.version}); "
                             "pass --append to add new inputs")
        # the same command again, after a run killed once its manifest was written: nothing is left to do
        refuse_empty(manifest, opts.dest)
        if progress:
            console.print(f"{public_url(opts.dest)} already holds this conversion of {public_url(opts.src)}")
        return ConvertSummary(layout=manifest.layout, format=manifest.format, version=manifest.version, added=0,
                              rejected=0, unchanged=len(listing.inputs), shards_written=[],
                              splits={name: split.samples for name, split in manifest.splits.items()},
                              skipped=listing.skipped)
    if manifest is not None:
        check_append(manifest, opts, listing)
    listing = with_holdout(listing, val_fraction(opts, manifest), src_root)
    check_writable(fs, root, opts.dest)
    if progress:
        how = "given" if listing.reason == "given" else f"auto: {escape(listing.reason)}"  # it may name a file
        console.print(f"layout: [bold]{listing.layout}[/] ({how}); {len(listing.inputs)} inputs", soft_wrap=True)
        for line in listing.skipped:
            console.print(f"warning: skipped {line}", markup=False, highlight=False, soft_wrap=True)
        for line in listing.untrained_classes():
            console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
        if listing.holdout is not None:
            console.print(f"no split folders: {listing.holdout:.0%} of the inputs held out as {HOLDOUT_SPLIT} "
                          "by a hash of their keys (--val-fraction)")
    state = load_state(fs, root, manifest, opts, listing)
    settings = Settings(src_fs, src_root, opts.max_side, opts.max_pixels, len(listing.classes))

    covered = {sample_key(r.path) for idx in state.resumed.values() for r in idx.rejects}
    covered |= {it.key for idx in state.resumed.values() for it in idx.items}
    known = {it.key: it for idx in state.committed.values() for it in idx.items}
    # Packed in a seeded pseudo-random order, not class by class as sources are listed: a reader that
    # streams the shards (with a shuffle buffer of any size) then gets batches that mix the classes.
    todo = sorted((inp for inp in listing.inputs if inp.key not in covered), key=lambda i: order_key(i.key, opts.seed))
    tasks = [(inp, inp.key in known) for inp in todo]
    if progress and state.resumed:
        console.print(f"resuming: {len(state.resumed)} finished shards kept, {len(tasks)} inputs left")

    written = list(state.resumed.values())
    with progress_bar(progress, "images") as bar:
        task = bar.add_task("converting", total=len(tasks))
        if client is not None or opts.dask is not None:
            from shards import distributed  # here: `distributed` takes a second to import, and only --dask needs it

            packer = distributed.pack(client, fs, root, opts, state, settings, tasks, known, written,
                                      advance=lambda: bar.advance(task))
        else:
            packer = pack(fs, root, opts, state, settings, tasks, known, written, advance=lambda: bar.advance(task))
    summary = commit(fs, root, opts, listing, state, written, packer)
    if progress:
        for line in [*summary.rejected_classes, *summary.boxless_splits()]:
            console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
    return summary


def pack(fs: fsspec.AbstractFileSystem, root: str, opts: ConvertOptions, state: StoreState, settings: Settings,
         tasks: list[tuple[Input, bool]], known: dict[str, IndexItem], written: list[ShardIndex],
         advance: Callable[[], None]) -> Packer:
    """Decode `tasks` in `opts.workers` processes here and pack them into shards, each written (and its index
    after it) as soon as it is full; their indexes are appended to `written`."""
    with tempfile.TemporaryDirectory(prefix="shardtrain-convert-") as tmp:
        build_dir = root if is_local(fs) else tmp

        def write(shard: OpenShard) -> None:
            samples = cast(list[Sample], shard.samples)  # packed from run_workers' results: all decode.Samples
            index = write_shard(fs, root, build_dir, opts.format, state.version, shard, samples)
            write_index(fs, root, index)
            written.append(index)

        packer = Packer(parse_shard_size(opts.shard_size), state, write)
        for result in run_workers(settings, tasks, opts.workers):
            packer.take(result, known, fail=opts.on_error == "fail")
            advance()
        packer.finish()
    return packer


def check_dest(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """DEST must be a folder that is new, empty, a store, or what an interrupted conversion left:
    never a file, and never someone's folder of other things, which a conversion would write into."""
    if fs.isfile(root):
        raise StoreError(f"DEST {public_url(url)} is a file, not a folder: give a new or empty folder for the store")
    if not fs.isdir(root) or fs.exists(join(root, MANIFEST)):
        return
    names = (path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False))
    foreign = sorted(n for n in names if not left_by_a_conversion(n))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StoreError(f"DEST {public_url(url)} is not empty and holds no shard store (no {MANIFEST}): it has "
                         f"{shown}; give a new or empty folder")


def left_by_a_conversion(name: str) -> bool:
    """Whether a file named `name` in DEST is one a conversion writes, or the temp file of one (a kill mid-write)."""
    name = name.removesuffix(".tmp")
    return name in _OUR_FILES or bool(_SHARD_FILE.match(name))


def val_fraction(opts: ConvertOptions, manifest: Manifest | None) -> float | None:
    """The holdout to list the source with: an existing store's own, so that no image changes split."""
    if manifest is None:
        return opts.val_fraction
    stored = manifest.holdout.fraction if manifest.holdout else 0.0
    if opts.val_fraction is not None and opts.val_fraction != stored:
        raise StoreError(f"--val-fraction {opts.val_fraction}: the store at {public_url(opts.dest)} holds out "
                         f"{stored}, and its images never change split; leave --val-fraction out, or convert "
                         "into an empty DEST")
    return stored


def same_conversion(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest, opts: ConvertOptions,
                    listing: Listing) -> bool:
    """Whether the store is a finished, never appended conversion of exactly these inputs with these options."""
    if manifest.version != 1 or (manifest.source, manifest.format, manifest.settings) != (
            public_url(opts.src), opts.format, conversion_settings(opts)):
        return False
    stored = {it.key for idx in read_indexes(fs, root, manifest).values() for it in idx.items}
    stored |= {sample_key(r.path) for r in read_rejects(fs, root)}
    return stored == {inp.key for inp in listing.inputs}


def check_format(manifest: Manifest, opts: ConvertOptions) -> None:
    """A store takes shards of its own format only: said before anything else (a rerun's "pass --append" would
    lead to this refusal)."""
    if manifest.format != opts.format:
        raise StoreError(f"{public_url(opts.dest)} holds a {manifest.format} store, and {opts.format} shards cannot "
                         f"be written into it; give another DEST, or --format {manifest.format}")


def check_append(manifest: Manifest, opts: ConvertOptions, listing: Listing) -> None:
    """That the source's inputs can join the store: the same layout, classes, sample order and split rule (its
    format: check_format)."""
    for what, old, new in (("layout", manifest.layout, listing.layout), ("classes", manifest.classes, listing.classes)):
        if old != new:
            raise StoreError(f"cannot append: the store's {what} is {old}, the source's is {new}")
    if manifest.order.rule == "key-hash" and manifest.order.seed != opts.seed:
        raise StoreError(f"cannot append: the store's samples are ordered with --seed {manifest.order.seed}, "
                         f"not {opts.seed}")
    if manifest.holdout and manifest.holdout.fraction and listing.split_folders:
        raise StoreError(f"cannot append: the store holds out {manifest.holdout.fraction:g} of its inputs as val by "
                         "a hash of their keys, and the source has split folders; append a source without them "
                         "(SRC/<class>/...), or convert into an empty DEST")


def load_state(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest | None, opts: ConvertOptions,
               listing: Listing) -> StoreState:
    in_store = {s.name for split in (manifest.splits.values() if manifest else []) for s in split.shards}
    indexes = read_indexes(fs, root, manifest)
    version = manifest.version + 1 if manifest else 1
    resumed = {
        name: idx for name, idx in indexes.items()
        if name not in in_store and idx.version == version and shard_is_whole(fs, root, idx)
    }
    other = next((n for n in resumed if not n.endswith("." + SUFFIX[opts.format])), None)
    if other is not None:
        raise StoreError(f"{public_url(opts.dest)} holds an unfinished conversion to another format ({other}); "
                         "rerun that command, or convert into an empty DEST")
    return StoreState(
        manifest=manifest,
        committed={n: idx for n, idx in indexes.items() if n in in_store},
        resumed=resumed,
        old_rejects=read_rejects(fs, root) if manifest else [],
    )


def shard_is_whole(fs: fsspec.AbstractFileSystem, root: str, index: ShardIndex) -> bool:
    try:
        return fs.size(join(root, index.shard)) == index.bytes
    except FileNotFoundError:
        return False


def run_workers(settings: Settings, tasks: list[tuple[Input, bool]], workers: int) -> Iterator[Result]:
    """Results in task order, from worker processes (or in this process for one worker).

    A worker that dies (the kernel's OOM killer, a kill -9) is a one-line error, and the shards finished so far
    stay for a rerun to resume from.
    """
    work = partial(process, settings)
    if workers <= 1 or len(tasks) <= 1:
        yield from map(work, tasks)
        return
    chunksize = max(1, min(32, len(tasks) // (workers * 8)))
    try:
        yield from ordered_map(work, tasks, workers, chunksize)
    except WorkerDied as e:
        raise StoreError(f"a decoding worker process died ({e}: out of memory, or killed); the finished "
                         "shards are kept: rerun the same command to resume, with fewer --workers if memory is short"
                         ) from None


class Packer:
    """Takes results in input order and packs samples into shards, one open shard per split; a full shard
    goes to `write`. A sample may be a decode.Sample or anything with its `input`, `sha1` and `nbytes`."""

    def __init__(self, limit: ShardLimit, state: StoreState, write: Callable[[OpenShard], None]) -> None:
        self.limit, self.write = limit, write
        self.old_rejects: dict[tuple[str, str | None], set[str | None]] = {}  # label digests by (path, sha1)
        for r in state.old_rejects:
            self.old_rejects.setdefault((r.path, r.sha1), set()).add(r.label_sha1)
        stored = [*state.committed.values(), *state.resumed.values()]
        self.first_of = {it.sha1: it.key for idx in stored for it in idx.items}  # for duplicates
        self.next_number: dict[str, int] = {}
        for idx in stored:
            number = int(idx.shard.rsplit("-", 1)[1].split(".")[0])
            self.next_number[idx.split] = max(self.next_number.get(idx.split, 0), number + 1)
        self.open: dict[str, OpenShard] = {}
        self.trailing: list[RejectRecord] = []
        self.unchanged = 0

    def take(self, result: Reject | Digest | Packable, known: dict[str, IndexItem], fail: bool) -> None:
        item = result.input
        if isinstance(result, Digest):
            change = what_changed(result, known[item.key])
            if change is None or self.rejected_before(item.relpath, result.sha1, result.label_sha1):
                self.unchanged += 1
                return
            result = Reject(item, result.sha1, "changed", f"{change} (kept; to take the change, {TAKE_A_CHANGE})",
                            label_sha1=result.label_sha1)
        elif isinstance(result, Reject) and item.key in known:  # a stored sample's input, unreadable now
            result = replace(result, detail=f"{result.detail} (the stored sample {item.key} is kept)")
        if not isinstance(result, Reject) and result.sha1 in self.first_of:
            first = self.first_of[result.sha1]
            result = Reject(item, result.sha1, "duplicate", f"same content as {first}", of=first)
        if isinstance(result, Reject):
            self.reject(result, fail)
        else:
            self.first_of[result.sha1] = item.key
            self.add(result)

    def rejected_before(self, path: str, sha1: str | None, label_sha1: str | None) -> bool:
        """Whether rejects.jsonl already has this input with this content. Where either side has no label
        digest (other layouts, rejects met before decoding the label, stores from before they were recorded),
        the image's decides."""
        labels = self.old_rejects.get((path, sha1))
        return labels is not None and (label_sha1 is None or None in labels or label_sha1 in labels)

    def reject(self, r: Reject, fail: bool) -> None:
        if self.rejected_before(r.input.relpath, r.sha1, r.label_sha1):
            self.unchanged += 1
            return
        if fail:
            raise StoreError(f"{r.input.relpath}: {r.reason}: {r.detail}")
        record = RejectRecord(path=r.input.relpath, reason=r.reason, detail=r.detail, sha1=r.sha1, of=r.of,
                              label_sha1=r.label_sha1)
        self.shard_for(r.input.split).rejects.append(record)

    def shard_for(self, split: str) -> OpenShard:
        if split not in self.open:
            self.open[split] = OpenShard(split, self.next_number.get(split, 0))
        return self.open[split]

    def add(self, sample: Packable) -> None:
        shard = self.shard_for(sample.input.split)
        size = payload_bytes(sample.nbytes)
        if self.limit.full(len(shard.samples), shard.nbytes, size):
            self.close(shard)
            shard = self.shard_for(sample.input.split)
        shard.samples.append(sample)
        shard.nbytes += size

    def close(self, shard: OpenShard) -> None:
        del self.open[shard.split]
        self.next_number[shard.split] = shard.number + 1
        self.write(shard)

    def finish(self) -> None:
        for shard in list(self.open.values()):
            if shard.samples:
                self.close(shard)
            else:
                self.trailing.extend(shard.rejects)
                del self.open[shard.split]


# How to take a change to a stored sample's input, which --append never replaces: said by each `changed`
# reject's detail and by ConvertSummary.kept_changes.
TAKE_A_CHANGE = "convert the source into a new, empty DEST and train on that store"


def what_changed(found: Digest, stored: IndexItem) -> str | None:
    """How an input already in the store differs from its stored sample (None: it does not). A label is
    compared only where the store recorded its digest (yolo stores written since it was)."""
    if found.sha1 != stored.sha1:
        return f"content differs from the stored sample {stored.key}"
    if stored.label_sha1 is None or found.label_sha1 == stored.label_sha1:
        return None
    label = found.input.label_relpath
    if found.label_sha1 == EMPTY_LABEL:
        return f"label {label} is now missing or empty, unlike the stored sample {stored.key}'s"
    return f"label {label} differs from the stored sample {stored.key}'s"


def write_shard(fs: fsspec.AbstractFileSystem, root: str, build_dir: str, fmt: str, version: int,
                shard: OpenShard, samples: list[Sample]) -> ShardIndex:
    """Write `shard` under a temporary name in `build_dir` and publish it; returns its index (not yet written).
    `samples`: the shard's, with their images."""
    name = shard_name(shard.split, shard.number, fmt)
    build = join(build_dir, f".{name}.partial")
    WRITERS[fmt](build, samples)
    nbytes, sha256 = file_digest(build)
    idx = make_idx(build) if fmt == "wds" else None
    publish_file(fs, build, join(root, name))
    if idx is not None:  # after its shard, before the shard's _index/ file: a shard with that has its .idx too
        write_bytes_atomic(fs, join(root, idx_name(name)), idx)
    return ShardIndex(
        shard=name, split=shard.split, version=version, samples=len(samples), bytes=nbytes,
        sha256=sha256, idx_sha256=hashlib.sha256(idx).hexdigest() if idx is not None else None,
        boxes=box_count(samples), rejects=shard.rejects,
        items=[IndexItem(key=s.input.key, path=s.input.relpath, sha1=s.sha1, label_sha1=s.label_sha1)
               for s in samples],
    )


def box_count(samples: list[Sample]) -> int | None:
    """The boxes a yolo shard's samples hold (an image without a label file holds none); None for other layouts."""
    counts = [len(s.meta["boxes"]) for s in samples if "boxes" in s.meta]
    return sum(counts) if counts else None


def new_rejects(written: list[ShardIndex], packer: Packer) -> list[RejectRecord]:
    found = [r for idx in written for r in idx.rejects] + packer.trailing
    return sorted(found, key=lambda r: r.path)


def commit(fs: fsspec.AbstractFileSystem, root: str, opts: ConvertOptions, listing: Listing,
           state: StoreState, written: list[ShardIndex], packer: Packer) -> ConvertSummary:
    """Write rejects.jsonl, _info.json and, last, manifest.json (unless nothing changed). `written`: the
    indexes of the shards this run added, a resumed run's earlier ones first."""
    added = sum(idx.samples for idx in written)
    rejects = new_rejects(written, packer)
    old = state.manifest
    version = state.version if added or old is None else old.version
    for r in rejects:
        r.version = version
    if old is not None and not added and not rejects:
        manifest = old  # nothing new: the store stays byte for byte as it was
    else:
        new_shards = [(idx.split, idx.entry(index_sha256(fs, root, idx.shard))) for idx in written]
        manifest = build_manifest(opts, listing, old, version, new_shards,
                                  rejects=len(state.old_rejects) + len(rejects))
        write_rejects(fs, root, state.old_rejects + rejects)
        if manifest.format == "wds":
            write_timm_info(fs, root, manifest)
        write_manifest(fs, root, manifest)
    refuse_empty(manifest, opts.dest)
    return ConvertSummary(
        layout=listing.layout, format=manifest.format, version=manifest.version, added=added,
        rejected=len(rejects), rejected_by_reason=dict(sorted(Counter(r.reason for r in rejects).items())),
        unchanged=packer.unchanged,
        shards_written=[idx.shard for idx in written],
        splits={name: split.samples for name, split in manifest.splits.items()}, skipped=listing.skipped,
        untrained_classes=listing.untrained_classes(),
        rejected_classes=rejected_classes(listing, stored_keys([*state.committed.values(), *written]),
                                          state.old_rejects + rejects),
        boxes={name: split.boxes for name, split in manifest.splits.items() if split.boxes is not None},
        label_folders=listing.label_folders(), unmatched_label_folders=listing.unmatched_label_folders,
    )


def stored_keys(indexes: Iterable[ShardIndex]) -> set[str]:
    return {it.key for idx in indexes for it in idx.items}


def rejected_classes(listing: Listing, stored: set[str], rejects: list[RejectRecord]) -> list[str]:
    """imagefolder: a line for each class that has train images in SRC but not one of them in the store, every
    one rejected (unreadable, too small, duplicates of another class's image): a classifier never learns it."""
    reasons = {sample_key(r.path): r.reason for r in rejects}
    per_class: dict[int, list[str]] = {}
    for inp in listing.inputs:
        if inp.cls is not None and inp.split == "train":
            per_class.setdefault(inp.cls, []).append(inp.key)
    lines = []
    for cls, keys in sorted(per_class.items()):
        if not stored.intersection(keys):
            why = Counter(reasons.get(k, "not stored") for k in keys)
            counts = ", ".join(f"{reason} {n}" for reason, n in sorted(why.items()))
            lines.append(f"class {listing.classes[cls]}: none of its {len(keys)} train images is stored ({counts}): "
                         "a classifier never learns it")
    return lines


def refuse_empty(manifest: Manifest, dest: str) -> None:
    """A store without a sample (every input rejected) is a failed conversion, not one to train on; it stays
    written, so that its rejects.jsonl and `inspect` show why."""
    if manifest.totals.samples == 0:
        url = public_url(dest)
        raise StoreError(f"every input was rejected ({manifest.rejects}), so {url} holds no sample: the reasons "
                         f"are in {url}/rejects.jsonl, counted by `shardtrain inspect {url}`")


def build_manifest(opts: ConvertOptions, listing: Listing, old: Manifest | None, version: int,
                   written: Iterable[tuple[str, ShardEntry]], rejects: int) -> Manifest:
    """The manifest after this run: `old`'s shards plus `written`, (split, entry) per shard this run added."""
    shards: dict[str, list[ShardEntry]] = {n: list(s.shards) for n, s in (old.splits.items() if old else [])}
    for split, entry in written:
        shards.setdefault(split, []).append(entry)
    splits = {
        name: SplitEntry(samples=sum(s.samples for s in entries), bytes=sum(s.bytes for s in entries),
                         shards=sorted(entries, key=lambda s: s.name), boxes=split_boxes(entries))
        for name, entries in sorted(shards.items())
    }
    now = now_utc()
    return Manifest(
        format=opts.format, format_version=FORMAT_VERSION, version=version,
        created=old.created if old else now, updated=now, layout=listing.layout, classes=listing.classes,
        source=public_url(opts.src),
        settings=conversion_settings(opts),
        rejects=rejects, splits=splits,
        order=old.order if old and old.order.rule == "key-hash" else
        SampleOrder(rule="key-hash", seed=opts.seed, since_version=version),
        holdout=None if listing.holdout is None else Holdout(fraction=listing.holdout, split=HOLDOUT_SPLIT,
                                                             rule=HOLDOUT_RULE),
        totals=Totals(samples=sum(s.samples for s in splits.values()), bytes=sum(s.bytes for s in splits.values()),
                      shards=sum(len(s.shards) for s in splits.values())),
    )


def split_boxes(entries: list[ShardEntry]) -> int | None:
    """A split's boxes, where each of its shards recorded its count (shards of older stores did not)."""
    counts = [e.boxes for e in entries]
    return None if None in counts else sum(c for c in counts if c is not None)


def conversion_settings(opts: ConvertOptions) -> dict:
    """The options recorded in manifest.json's `settings`."""
    return {"shard_size": opts.shard_size, "max_side": opts.max_side, "max_pixels": opts.max_pixels}
