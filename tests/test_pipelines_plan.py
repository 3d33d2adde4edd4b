"""The split arithmetic (pipelines/plan.py), checked over many store shapes."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import plan

SHAPES = [([1], 1, 1), ([7], 2, 2), ([5, 5, 3], 2, 4), ([100, 1, 17, 64], 3, 8), ([9] * 13, 4, 5), ([3, 0, 4], 2, 2)]


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
@pytest.mark.parametrize("counts,world,batch", SHAPES)
def test_eval_covers_every_sample_once_in_store_order(fmt, counts, world, batch):
    seq = plan.epoch_sequence(counts, fmt, train=False, seed=0, epoch=5)
    per_rank = [plan.rank_batches(seq, plan.rank_span(len(seq), rank=r, world_size=world, batch_size=batch, train=False), batch) for r in range(world)]
    flat = np.concatenate([b for rank in per_rank for b in rank] or [np.zeros(0, dtype=np.int64)])
    assert flat.tolist() == list(range(sum(counts)))
    sizes = [len(rank) for rank in per_rank]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
@pytest.mark.parametrize("counts,world,batch", SHAPES)
def test_train_gives_every_rank_the_same_full_batches(fmt, counts, world, batch):
    n = sum(counts)
    for epoch in range(3):
        seq = plan.epoch_sequence(counts, fmt, train=True, seed=1, epoch=epoch)
        assert sorted(seq.tolist()) == list(range(n))
        per_rank = [plan.rank_batches(seq, plan.rank_span(n, rank=r, world_size=world, batch_size=batch, train=True), batch) for r in range(world)]
        assert len({len(rank) for rank in per_rank}) == 1
        assert all(len(b) == batch for rank in per_rank for b in rank)
        used = [int(i) for rank in per_rank for b in rank for i in b]
        assert len(used) == len(set(used)) == n // (world * batch) * world * batch


def test_wds_train_reads_whole_shards_in_a_new_order_each_epoch():
    counts = [4, 4, 4, 4, 4, 4]
    orders = []
    for epoch in range(4):
        seq = plan.epoch_sequence(counts, "wds", train=True, seed=3, epoch=epoch)
        shards = seq.reshape(6, 4) // 4
        assert (shards == shards[:, :1]).all()  # each shard read contiguously
        assert (np.diff(seq.reshape(6, 4), axis=1) == 1).all()  # front to back
        orders.append(tuple(shards[:, 0]))
    assert len(set(orders)) > 1
    assert plan.epoch_sequence(counts, "wds", train=True, seed=3, epoch=2).tolist() == list(np.concatenate([np.arange(o * 4, o * 4 + 4) for o in orders[2]]))


def test_window_shuffle_mixes_samples_only_within_a_workers_window():
    batches = [np.arange(i * 4, i * 4 + 4) for i in range(10)]
    out = plan.window_shuffle(batches, workers=2, window=3, seed=0, epoch=0, rank=0)
    assert [len(b) for b in out] == [4] * 10
    assert sorted(np.concatenate(out).tolist()) == list(range(40))
    for w in range(2):
        mine = list(range(w, 10, 2))
        for g in range(0, len(mine), 3):
            ids = mine[g : g + 3]
            assert sorted(np.concatenate([out[i] for i in ids]).tolist()) == sorted(np.concatenate([batches[i] for i in ids]).tolist())
    assert any(not np.array_equal(a, b) for a, b in zip(out, batches))
    again = plan.window_shuffle(batches, workers=2, window=3, seed=0, epoch=0, rank=0)
    assert all(np.array_equal(a, b) for a, b in zip(out, again))


def test_sample_seeds_depend_on_position_only():
    a = plan.sample_seeds(0, 1, 0, 5, 4)
    assert a == plan.sample_seeds(0, 1, 0, 5, 4)
    assert len(set(a)) == 4
    for other in (plan.sample_seeds(1, 1, 0, 5, 4), plan.sample_seeds(0, 2, 0, 5, 4), plan.sample_seeds(0, 1, 1, 5, 4), plan.sample_seeds(0, 1, 0, 6, 4)):
        assert other != a
