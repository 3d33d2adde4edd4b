"""Reading stores the way an outside reader would (plain tarfile/lmdb per docs/store-format.md),
plus the no-lock-in checks: webdataset and timm read our tars on their own.

`read_store` is imported by the other tests/test_shards_*.py files.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import lmdb
import pytest
from PIL import Image

from shards import ConvertOptions, convert, read_manifest


def read_store(dest: str | Path) -> dict[str, dict]:
    """key -> {"split", "shard", "ext", "image", "cls"/"boxes"/"labels"} for every sample in the store."""
    manifest = read_manifest(str(dest))
    samples: dict[str, dict] = {}
    for split, entry in manifest.splits.items():
        for shard in entry.shards:
            path = Path(dest) / shard.name
            found = read_tar(path) if manifest.format == "wds" else read_lmdb(path)
            assert len(found) == shard.samples, shard.name
            for key, sample in found.items():
                assert key not in samples, f"{key} in two shards"
                samples[key] = {"split": split, "shard": shard.name, **sample}
    return samples


def read_tar(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            file = tar.extractfile(member)
            assert file is not None, f"{path}: {member.name} is not a regular file"
            data = file.read()
            sample = out.setdefault(key, {})
            if ext == "cls":
                sample["cls"] = int(data)
            elif ext == "json":
                sample.update(json.loads(data))
            else:
                sample["ext"], sample["image"] = ext, data
    return out


def read_lmdb(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        length = txn.get(b"__len__")
        assert length is not None, f"{path}: no __len__ key"
        for i in range(int(length)):
            record = txn.get(b"%08d" % i)
            assert record is not None, f"{path}: record {i} missing"
            n = int.from_bytes(record[:4], "big")
            header = json.loads(record[4:4 + n])
            key = header.pop("key")
            out[key] = {**header, "image": bytes(record[4 + n:])}
    env.close()
    return out


def decode(image: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(image))
    img.load()
    return img


@pytest.fixture(scope="module")
def wds_store(imagefolder_src, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("wds") / "pets"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), shard_size="50samples", workers=1),
            progress=False)
    return dest


def test_webdataset_reads_the_tars_alone(wds_store):
    import webdataset as wds

    manifest = read_manifest(str(wds_store))
    urls = [str(wds_store / s.name) for s in manifest.splits["train"].shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls"))
    assert len(samples) == manifest.splits["train"].samples
    stored = read_store(wds_store)
    for key, img, cls in samples:
        assert img.size == (48, 48)
        assert cls == stored[key]["cls"]
        assert manifest.classes[cls] in key  # the class folder is part of the key


def test_timm_wds_reader_reads_the_store(wds_store):
    from timm.data import create_dataset

    manifest = read_manifest(str(wds_store))
    for split in ("train", "val"):
        ds = create_dataset(f"wds/{wds_store.name}", root=str(wds_store), split=split)
        assert len(ds) == manifest.splits[split].samples
        items = list(ds)
        assert len(items) == manifest.splits[split].samples
        assert {target for _, target in items} == set(range(len(manifest.classes)))
        assert all(img.size == (48, 48) for img, _ in items)
