"""The split arithmetic (pipelines/plan.py), checked over many store shapes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines import plan

SHAPES = [([1], 1, 1), ([7], 2, 2), ([5, 5, 3], 2, 4), ([100, 1, 17, 64], 3, 8), ([9] * 13, 4, 5), ([3, 0, 4], 2, 2)]


@pytest.mark.parametrize("counts,world,batch", SHAPES)
def test_eval_covers_every_sample_once_in_store_order(counts, world, batch):
    seq = plan.epoch_sequence(counts, train=False, seed=0, epoch=5, block=4)
    per_rank = [
        plan.rank_batches(seq, plan.rank_span(len(seq), rank=r, world_size=world, batch_size=batch, train=False), batch)
        for r in range(world)
    ]
    flat = np.concatenate([b for rank in per_rank for b in rank] or [np.zeros(0, dtype=np.int64)])
    assert flat.tolist() == list(range(sum(counts)))
    sizes = [len(rank) for rank in per_rank]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("block", [1, 5, 1000])
@pytest.mark.parametrize("counts,world,batch", SHAPES)
def test_train_gives_every_rank_the_same_full_batches(block, counts, world, batch):
    n = sum(counts)
    for epoch in range(3):
        seq = plan.epoch_sequence(counts, train=True, seed=1, epoch=epoch, block=block)
        assert sorted(seq.tolist()) == list(range(n))
        per_rank = [
            plan.rank_batches(seq, plan.rank_span(n, rank=r, world_size=world, batch_size=batch, train=True), batch)
            for r in range(world)
        ]
        assert len({len(rank) for rank in per_rank}) == 1
        assert all(len(b) == batch for rank in per_rank for b in rank)
        used = [int(i) for rank in per_rank for b in rank for i in b]
        assert len(used) == len(set(used)) == n // (world * batch) * world * batch


def test_train_permutes_within_blocks_of_the_shuffled_shard_order():
    counts, block = [4] * 6, 8  # a block is two shards' samples
    orders = []
    for epoch in range(4):
        seq = plan.epoch_sequence(counts, train=True, seed=3, epoch=epoch, block=block)
        blocks = seq.reshape(3, block) // 4
        for b in blocks.tolist():  # each block: all four samples of each of two shards
            assert sorted(Counter(b).values()) == [4, 4]
        assert not (np.diff(seq.reshape(3, block), axis=1) == 1).all()  # not front to back
        orders.append(tuple(tuple(sorted(set(b))) for b in blocks.tolist()))
    assert len(set(orders)) > 1  # the shards meet other shards each epoch
    assert plan.epoch_sequence(counts, train=True, seed=3, epoch=2, block=block).tolist() == \
        plan.epoch_sequence(counts, train=True, seed=3, epoch=2, block=block).tolist()


def test_a_split_within_one_block_is_one_permutation():
    counts = [50, 50]  # two shards; a whole-split block mixes them in every part of the sequence
    seq = plan.epoch_sequence(counts, train=True, seed=0, epoch=0, block=1000)
    first_half_shards = set((seq[:50] // 50).tolist())
    assert first_half_shards == {0, 1}


def test_sample_seeds_depend_on_position_only():
    a = plan.sample_seeds(0, 1, 0, 5, 4)
    assert a == plan.sample_seeds(0, 1, 0, 5, 4)
    assert len(set(a)) == 4
    for other in (
        plan.sample_seeds(1, 1, 0, 5, 4),
        plan.sample_seeds(0, 2, 0, 5, 4),
        plan.sample_seeds(0, 1, 1, 5, 4),
        plan.sample_seeds(0, 1, 0, 6, 4),
    ):
        assert other != a


def layout_batches(seq: np.ndarray, world: int, batch: int) -> list[list[np.ndarray]]:
    return [plan.rank_batches(seq, plan.rank_span(len(seq), rank=r, world_size=world, batch_size=batch, train=True),
                              batch) for r in range(world)]


@pytest.mark.parametrize("layouts", [[(2, 4), (1, 4)], [(2, 4), (4, 4)], [(4, 2), (3, 2), (1, 2)], [(1, 3), (2, 5)],
                                     [(3, 4), (3, 4), (2, 4)]])
@pytest.mark.parametrize("seed", range(5))
def test_an_epoch_resumed_on_other_layouts_takes_each_sample_once(layouts, seed):
    """An epoch trained part way on one layout (process count, batch size), then on the next, and so on: every
    sample is taken at most once, and of what the first layout would have yielded only each later layout's tail
    of the rest it was given (less than a batch on each of its ranks) is left out."""
    rng = np.random.default_rng(seed)
    counts = [9] * 13
    seq = plan.epoch_sequence(counts, train=True, seed=seed, epoch=2, block=20)
    taken: list[plan.Taken] = []
    used: list[int] = []
    left_out = 0
    for k, (world, batch) in enumerate(layouts):
        rest = plan.rest_of_epoch(seq, taken)
        left_out += len(rest) % (world * batch) if k else 0
        assert len(rest) == plan.rest_length(len(seq), taken)
        per_rank = layout_batches(rest, world, batch)
        first = plan.first_batch(len(seq), taken, world_size=world, batch_size=batch)
        assert first + len(per_rank[0]) == len(seq) // (world * batch)  # the rest ends where a whole epoch does
        last = k == len(layouts) - 1
        done = len(per_rank[0]) if last else int(rng.integers(0, len(per_rank[0]) + 1))
        used += [int(i) for rank in per_rank for b in rank[:done] for i in b]
        taken.append((world, batch, done))
    assert len(used) == len(set(used))
    first_kept = len(seq) // (layouts[0][0] * layouts[0][1]) * layouts[0][0] * layouts[0][1]
    assert set(used) <= set(seq[:first_kept].tolist()) and len(used) == first_kept - left_out
