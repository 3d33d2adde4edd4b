"""Which samples each rank yields in which batch of an epoch: pure arithmetic on shard counts.

Samples are numbered globally by concatenating the split's shards in manifest order. An
epoch is a sequence of those numbers (`epoch_sequence`); a rank takes one contiguous
slice of it (`rank_span`) cut into batches (`rank_batches`). Everything is a function of
(seed, epoch, rank, world size, batch size[, workers]), so a resumed run recomputes it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Format = Literal["wds", "lmdb"]


def shard_starts(counts: list[int]) -> np.ndarray:
    """Global number of each shard's first sample (one extra entry: the total)."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def epoch_sequence(counts: list[int], fmt: Format, *, train: bool, seed: int, epoch: int) -> np.ndarray:
    """The epoch's sample order. Eval: store order. Train: wds reshuffles the shard order
    (then reads each shard front to back, as tars stream); lmdb permutes all samples."""
    starts = shard_starts(counts)
    if not train:
        return np.arange(starts[-1], dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    if fmt == "lmdb":
        return rng.permutation(starts[-1]).astype(np.int64)
    order = rng.permutation(len(counts))
    return np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order] or [np.zeros(0)]).astype(np.int64)


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


def window_shuffle(batches: list[np.ndarray], *, workers: int, window: int, seed: int, epoch: int, rank: int) -> list[np.ndarray]:
    """A reproducible sample shuffle buffer for streamed shards.

    DataLoader hands batch i to worker i % workers; each worker's consecutive batches are
    grouped `window` at a time and their samples permuted among them. A worker thus only
    ever reads samples of its own batches (no extra reads), and the result depends on
    position alone, which is what makes an exact mid-epoch resume possible.
    """
    workers = max(workers, 1)
    out = list(batches)
    for w in range(workers):
        mine = list(range(w, len(batches), workers))
        for g in range(0, len(mine), window):
            ids = mine[g : g + window]
            pool = np.concatenate([batches[i] for i in ids])
            pool = np.random.default_rng([seed, epoch, rank, w, g]).permutation(pool)
            bounds = np.cumsum([len(batches[i]) for i in ids])[:-1]
            for i, part in zip(ids, np.split(pool, bounds)):
                out[i] = part
    return out


def sample_seeds(seed: int, epoch: int, rank: int, batch: int, count: int) -> list[int]:
    """One augmentation seed per position of a batch: a function of its place in the epoch."""
    return [int(s) for s in np.random.SeedSequence([seed, epoch, rank, batch]).generate_state(count)]
