"""Which samples each rank yields in which batch of an epoch: pure arithmetic on shard counts.

Samples are numbered globally by concatenating the split's shards in manifest order. An
epoch is a sequence of those numbers (`epoch_sequence`); a rank takes one contiguous
slice of it (`rank_span`) cut into batches (`rank_batches`). Everything is a function of
(seed, epoch, shuffle block, rank, world size, batch size), so a resumed run recomputes it.

A run resumed mid-epoch on another process count (or batch size) splits what its epoch has left
(`rest_of_epoch`) among its ranks the same way; `Taken` records the layouts that trained the epoch's start.
"""

from __future__ import annotations

import numpy as np

Taken = tuple[int, int, int]  # (world size, batch size, batches each rank took): a layout that trained part of an epoch


def shard_starts(counts: list[int]) -> np.ndarray:
    """Global number of each shard's first sample (one extra entry: the total)."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def epoch_sequence(counts: list[int], *, train: bool, seed: int, epoch: int, block: int) -> np.ndarray:
    """The epoch's sample order. Eval: store order. Train: the shard order is reshuffled from (seed, epoch),
    then the samples are permuted within each run of `block` consecutive samples of that sequence
    (MosaicML Streaming's "py1b"). A batch thus mixes the samples of every shard in its block, in
    whatever order the store was written (class by class, as sources are listed), while a worker
    reads from only about `block` / shard size shards at a time. A split of at most `block`
    samples is one full permutation.
    """
    starts = shard_starts(counts)
    if not train:
        return np.arange(starts[-1], dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(counts))
    sequence = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order] or [np.zeros(0)]).astype(np.int64)
    for lo in range(0, len(sequence), block):
        sequence[lo : lo + block] = rng.permutation(sequence[lo : lo + block])
    return sequence


def rank_span(total: int, *, rank: int, world_size: int, batch_size: int, train: bool) -> tuple[int, int]:
    """This rank's contiguous [start, stop) of the epoch sequence.

    Train keeps the first floor(N / (W*B)) * W*B samples, so every rank gets the same
    number of full batches; eval splits all N as evenly as possible (sizes differ by <= 1).
    """
    kept = total // (world_size * batch_size) * world_size * batch_size if train else total
    return rank * kept // world_size, (rank + 1) * kept // world_size


def rank_batches(sequence: np.ndarray, span: tuple[int, int], batch_size: int) -> list[np.ndarray]:
    part = sequence[span[0] : span[1]]
    return [part[i : i + batch_size] for i in range(0, len(part), batch_size)]


def sample_seeds(seed: int, epoch: int, rank: int, batch: int, count: int) -> list[int]:
    """One augmentation seed per position of a batch: a function of its place in the epoch."""
    return [int(s) for s in np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(count)]


def rest_of_epoch(sequence: np.ndarray, taken: list[Taken]) -> np.ndarray:
    """What an epoch's train sequence has left after `taken`, in order: each layout, in turn, split what was left
    into its ranks' spans and its ranks took the first batches of theirs. The samples no rank of a layout would
    reach (its left-out tail) are not part of the rest."""
    for world_size, batch_size, batches in taken:
        spans = [rank_span(len(sequence), rank=r, world_size=world_size, batch_size=batch_size, train=True)
                 for r in range(world_size)]
        sequence = np.concatenate([sequence[lo + batches * batch_size : hi] for lo, hi in spans])
    return sequence


def rest_length(total: int, taken: list[Taken]) -> int:
    """len(rest_of_epoch(sequence, taken)) for a sequence of `total` samples, without the sequence."""
    for world_size, batch_size, batches in taken:
        total = total // (world_size * batch_size) * world_size * batch_size - world_size * batches * batch_size
    return total


def first_batch(total: int, taken: list[Taken], *, world_size: int, batch_size: int) -> int:
    """The number of the first batch a rank yields from the rest of an epoch of `total` samples: the rest's batches
    are numbered so that they end where a whole epoch's do (0 when nothing was taken)."""
    whole = total // (world_size * batch_size)
    return whole - rest_length(total, taken) // (world_size * batch_size)
