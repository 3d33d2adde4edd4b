"""`convert --dask`: a conversion's decoding and shard writing on a Dask `distributed` cluster.

The client (the `shardtrain convert` process, or the flow's task) lists, orders and packs exactly as a
single-host conversion does (shards.convert); only the heavy work moves to the workers:

1. Each split's ordered inputs are cut into parts of up to PART_INPUTS. A worker decodes and checks a part
   (decode.process) and keeps the results; the client fetches only their summary (per input: the sha1 and
   stored size of a sample, or the reject), and takes them in the inputs' order into convert's Packer.
2. So the client decides what a single-host run decides, from the same facts: duplicates, unchanged
   inputs, where each reject is recorded and where each shard ends (byte-limited shards need the sizes
   after decoding).
3. A full shard is built by a worker from the parts that hold its samples (Dask moves them between
   workers) and published straight to DEST; the client writes its `_index/` entry once it is there, in
   the order a single-host run closes shards, so a killed client leaves what a killed single-host run
   leaves, and a rerun resumes the same way. manifest.json comes last, from convert.commit.

The workers hold a part only while an open shard may still need it. A part lost with its worker is
decoded again on another (Dask reruns it from its inputs; decoding is deterministic), so the store is
byte-identical to a single-host conversion of the same inputs, worker deaths included.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import cast

import fsspec
from distributed import Client, Future, KilledWorker, LocalCluster

from shards.convert import ConvertOptions, OpenShard, Packer, StoreState, parse_shard_size, write_shard
from shards.decode import Digest, Reject, Result, Sample, Settings, process
from shards.layouts import Input
from shards.manifest import IndexItem, ShardIndex, write_index
from shards.storage import StoreError, is_local

PART_INPUTS = 64  # at most, per part: about a second of decoding, so a lost worker costs little to redo
WORKERS_TIMEOUT = 60  # seconds to wait for a scheduler without workers to get one


@dataclass(frozen=True)
class SampleRef:
    """A decoded sample as the client sees it: what packing needs, while its image stays on a worker in
    the part `part` (a list of decode results) at position `pos`."""

    input: Input
    sha1: str
    nbytes: int
    part: Future
    pos: int


Outcome = Reject | Digest | SampleRef


# On the workers


def decode_part(settings: Settings, tasks: list[tuple[Input, bool]]) -> list[Result]:
    return [process(settings, task) for task in tasks]


def summarize(results: list[Result]) -> list[Reject | Digest | tuple[str, int]]:
    """What the client needs of a decoded part: all of it but the samples' images, of which it gets (sha1, size)."""
    return [(r.sha1, r.nbytes) if isinstance(r, Sample) else r for r in results]


def build_shard(fs: fsspec.AbstractFileSystem, root: str, fmt: str, version: int, shard: OpenShard,
                picks: list[tuple[int, int]], parts: list[list[Result]]) -> ShardIndex:
    """Write and publish `shard` to the store at `root` (a path the client resolved: absolute, never relative to
    the worker's folder), its samples being `picks`, (part, position) pairs into `parts`."""
    samples = cast(list[Sample], [parts[part][pos] for part, pos in picks])  # the client picks only Samples
    with tempfile.TemporaryDirectory(prefix="shardtrain-convert-") as tmp:
        return write_shard(fs, root, root if is_local(fs) else tmp, fmt, version, shard, samples)


# On the client


@contextlib.contextmanager
def connect(address: str) -> Iterator[Client]:
    """A client of the scheduler at `address`, or of a LocalCluster of N single-threaded processes for local:N.
    How long to try a scheduler is Dask's setting distributed.comm.timeouts.connect (DASK_DISTRIBUTED__COMM__\
    TIMEOUTS__CONNECT, default 30s)."""
    if address.startswith("local:"):
        with LocalCluster(**local_cluster_options(address)) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address)
    except (OSError, TimeoutError, ValueError) as e:
        raise StoreError(f"cannot reach the Dask scheduler at {address}: {e}") from None
    with client:
        yield client


def local_cluster_options(address: str) -> dict:
    """LocalCluster's options for local:N: N worker processes of one thread (as convert's own pool: decoding and
    checking are partly Python, held by the GIL), no dashboard (the scheduler's HTTP server, for health and
    metrics, on a free port rather than 8787, which warns when taken), only errors logged."""
    return {"n_workers": int(address.removeprefix("local:")), "threads_per_worker": 1, "processes": True,
            "dashboard_address": None, "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
            "silence_logs": logging.ERROR}


def pack(client: Client | None, fs: fsspec.AbstractFileSystem, root: str, opts: ConvertOptions, state: StoreState,
         settings: Settings, tasks: list[tuple[Input, bool]], known: dict[str, IndexItem], written: list[ShardIndex],
         advance: Callable[[], None]) -> Packer:
    """convert.pack on a Dask cluster (`client`'s, else `opts.dask`'s): the same shards, indexes and Packer state."""
    with contextlib.ExitStack() as stack:
        if client is None:
            assert opts.dask is not None
            client = stack.enter_context(connect(opts.dask))
        return pack_on(client, fs, root, opts, state, settings, tasks, known, written, advance)


def pack_on(client: Client, fs: fsspec.AbstractFileSystem, root: str, opts: ConvertOptions, state: StoreState,
            settings: Settings, tasks: list[tuple[Input, bool]], known: dict[str, IndexItem], written: list[ShardIndex],
            advance: Callable[[], None]) -> Packer:
    threads = worker_threads(client)
    writing: deque[Future] = deque()

    def finished(future: Future) -> None:
        index = result(future)
        write_index(fs, root, index)  # in closing order: the finished shards are always a prefix
        written.append(index)

    def write(shard: OpenShard) -> None:
        refs = cast(list[SampleRef], shard.samples)  # packed from summaries(): all SampleRefs
        parts = list({ref.part.key: ref.part for ref in refs}.values())
        number = {part.key: n for n, part in enumerate(parts)}
        picks = [(number[ref.part.key], ref.pos) for ref in refs]
        writing.append(client.submit(build_shard, fs, root, opts.format, state.version, replace(shard, samples=[]),
                                     picks, parts, pure=False))
        while writing and (writing[0].done() or len(writing) > threads):
            finished(writing.popleft())

    packer = Packer(parse_shard_size(opts.shard_size), state, write)
    by_split: dict[str, list[int]] = {}
    for n, (inp, _) in enumerate(tasks):
        by_split.setdefault(inp.split, []).append(n)
    size = max(1, min(PART_INPUTS, math.ceil(len(tasks) / (8 * threads))))
    streams = [summaries(client, settings, tasks, positions, size, ahead=2 * threads)
               for positions in by_split.values()]
    for _, outcome in heapq.merge(*streams, key=lambda pair: pair[0]):  # the single-host order: as in `tasks`
        packer.take(outcome, known, fail=opts.on_error == "fail")
        advance()
    packer.finish()
    while writing:
        finished(writing.popleft())
    return packer


def summaries(client: Client, settings: Settings, tasks: list[tuple[Input, bool]], positions: list[int],
              size: int, ahead: int) -> Iterator[tuple[int, Outcome]]:
    """(position, outcome) of the inputs at `positions` of `tasks` (one split's), in order: decoded in parts
    of `size`, with `ahead` parts submitted before they are needed."""
    chunks = (positions[i:i + size] for i in range(0, len(positions), size))
    queued: deque[tuple[list[int], Future, Future]] = deque()

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            part = client.submit(decode_part, settings, [tasks[n] for n in chunk], pure=False)
            queued.append((chunk, part, client.submit(summarize, part, pure=False)))

    for _ in range(ahead):
        submit()
    while queued:
        chunk, part, summary = queued.popleft()
        submit()
        for pos, (n, outcome) in enumerate(zip(chunk, result(summary))):
            if isinstance(outcome, tuple):
                # the part stays on the workers while a SampleRef holds its future; Dask decodes it again
                # (deterministically) if the worker holding it is lost
                sha1, nbytes = outcome
                yield n, SampleRef(tasks[n][0], sha1, nbytes, part, pos)
            else:
                yield n, outcome


def worker_threads(client: Client) -> int:
    if not client.nthreads():
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT)
        except TimeoutError:
            raise StoreError(f"the Dask scheduler at {client.scheduler.address} has no workers "
                             f"(waited {WORKERS_TIMEOUT} s)") from None
    return sum(client.nthreads().values())


def result(future: Future):
    """The future's result; a task whose workers kept dying is one line."""
    try:
        return future.result()
    except KilledWorker:
        raise StoreError("Dask workers kept dying (killed, e.g. out of memory) while running one part of the "
                         "conversion; the finished shards are kept: rerun to resume") from None
