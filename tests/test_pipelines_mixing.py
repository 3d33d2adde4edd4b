"""Batches mix classes like i.i.d. draws, from sources listed class by class as real ones are.

The source is 96 classes (regions of the bundled photos) of 48 images each, in class folders, so
its listing, and a store written in listing order, runs class by class. A batch of B drawn i.i.d.
from C equally common classes holds C * (1 - (1 - 1/C)**B) distinct classes on average; the
median over an epoch's train batches must reach 0.9 of that, on every rank.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset

from pipelines import DataConfig, build_loader
from shards import ConvertOptions, convert, inspect_store, read_manifest, samples
from shards.keys import sample_key
from shards.manifest import (
    IndexItem,
    Manifest,
    ShardIndex,
    SplitEntry,
    Totals,
    index_sha256,
    now_utc,
    write_index,
    write_manifest,
)
from shards.storage import open_fs
from shards.writers import file_digest

CLASSES, PER_CLASS, BATCH, PER_SHARD = 96, 48, 32, 1000
IID = CLASSES * (1 - (1 - 1 / CLASSES) ** BATCH)  # 27.5 distinct classes in a batch of 32
SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A flat class-folder tree: SRC/<class>/*.jpg, no split folders."""
    src = tmp_path_factory.mktemp("mixing") / "src"
    samples.make_imagefolder(src, {"train": PER_CLASS}, size=16, grid=4, flat=True)
    assert len(list(src.iterdir())) == CLASSES
    return src


def converted(source: Path, fmt: str) -> str:
    dest = source.parent / fmt
    if not dest.exists():
        convert(ConvertOptions(src=str(source), dest=str(dest), format=fmt, shard_size=f"{PER_SHARD}samples",
                               workers=2), progress=False)
    return str(dest)


@pytest.fixture(scope="module", params=["wds", "lmdb"])
def store(request, source) -> str:
    return converted(source, request.param)


@pytest.fixture(scope="module")
def sorted_store(source) -> str:
    """A wds store written in listing order, class by class, as shardtrain wrote them before the sample
    order was recorded (or as another tool writes them): tars, `_index/` files and a manifest."""
    dest = source.parent / "sorted"
    fs, root = open_fs(str(dest))
    fs.makedirs(root, exist_ok=True)
    classes = sorted(p.name for p in source.iterdir())
    listing = sorted(str(p.relative_to(source)) for p in source.rglob("*.jpg"))
    entries = []
    for number, lo in enumerate(range(0, len(listing), PER_SHARD)):
        name, part = f"train-{number:06d}.tar", listing[lo : lo + PER_SHARD]
        with webdataset.TarWriter(str(dest / name), mtime=0) as tar:
            for rel in part:
                tar.write({"__key__": sample_key(rel), "jpg": (source / rel).read_bytes(),
                           "cls": str(classes.index(rel.split("/")[0]))})
        size, sha256 = file_digest(str(dest / name))
        index = ShardIndex(shard=name, split="train", version=1, samples=len(part), bytes=size, sha256=sha256,
                           items=[IndexItem(key=sample_key(r), path=r, sha1="-") for r in part], rejects=[])
        write_index(fs, root, index)
        entries.append(index.entry(index_sha256(fs, root, name)))
    now = now_utc()
    split = SplitEntry(samples=len(listing), bytes=sum(e.bytes for e in entries), shards=entries)
    write_manifest(fs, root, Manifest(
        format="wds", format_version=1, version=1, created=now, updated=now, layout="imagefolder", classes=classes,
        source=str(source), settings={}, rejects=0, splits={"train": split},
        totals=Totals(samples=split.samples, bytes=split.bytes, shards=len(entries))))
    return str(dest)


def classes_per_batch(path: str, world_size: int) -> list[int]:
    """Distinct classes in each train batch of epoch 1, over every rank's loader."""
    counts = []
    for rank in range(world_size):
        cfg = DataConfig(path=path, image_size=16, batch_size=BATCH, workers=2)
        loader = build_loader(cfg, "train", train=True, task="classify", rank=rank, world_size=world_size, seed=0,
                              device=torch.device("cpu"))
        loader.set_epoch(1)
        counts += [len(torch.unique(batch["label"])) for batch in loader]
    return counts


@pytest.mark.parametrize("world_size", [1, 2])
def test_train_batches_mix_classes_like_iid_draws(store, world_size):
    counts = classes_per_batch(store, world_size)
    assert len(counts) == read_manifest(store).splits["train"].samples // (world_size * BATCH) * world_size
    assert statistics.median(counts) >= 0.9 * IID, counts


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_store_written_class_by_class_is_mixed_when_read(sorted_store, world_size):
    counts = classes_per_batch(sorted_store, world_size)
    assert statistics.median(counts) >= 0.9 * IID, counts


def test_plain_webdataset_with_a_shuffle_buffer_gets_mixed_batches_from_our_tars(source):
    urls = [str(p) for p in sorted(Path(converted(source, "wds")).glob("train-*.tar"))]
    dataset = webdataset.WebDataset(urls, shardshuffle=False).shuffle(100).to_tuple("cls").batched(BATCH, partial=False)
    counts = [len(set(np.asarray(labels).tolist())) for (labels,) in dataset]
    assert statistics.median(counts) >= 0.9 * IID, counts


def test_inspect_shows_how_many_classes_a_shard_holds(source, sorted_store):
    def mixing(path: str) -> dict:
        return inspect_store(path)["splits"]["train"]["classes_per_shard"]

    sorted_mix, mixed = mixing(sorted_store), mixing(converted(source, "wds"))
    assert sorted_mix["max"] <= PER_SHARD // PER_CLASS + 2  # 1000 samples in listing order: 21 or 22 classes
    per_shard_iid = CLASSES * (1 - (1 - 1 / CLASSES) ** PER_SHARD)
    assert mixed["median"] >= 0.9 * per_shard_iid, mixed
    out = subprocess.run([SHARDTRAIN, "inspect", sorted_store], capture_output=True, text=True, check=True).stdout
    assert "sample order: listing" in out and f"{sorted_mix['min']}-{sorted_mix['median']:g}-{sorted_mix['max']}" in out
