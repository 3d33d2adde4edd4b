"""Which samples each rank yields in which batch of an epoch: pure arithmetic on shard counts.

Samples are numbered globally by concatenating the split's shards in manifest order. An
epoch is a sequence of those numbers (`epoch_sequence`); a rank takes one contiguous
slice of it (`rank_span`) cut into batches (`rank_batches`). Everything is a function of
(seed, epoch, shuffle block, rank, world size, batch size), so a resumed run recomputes it.
"""

from __future__ import annotations

import numpy as np


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
