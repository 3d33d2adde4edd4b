"""The `.idx` beside each wds shard (shards/tarindex.py, docs/store-format.md "Sample indexes"): written by convert
in DALI's format, checked by verify, and read by the loader's reader in place of scanning the tar, which on object
storage reads the whole shard (counted here on a moto server's own request log)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import s3fs

from pipelines.readers import make_reader, scan_tar
from pipelines.store import open_split
from shards import ConvertOptions, convert, idx_name, idx_spans, read_manifest, verify
from tests.servers import MotoServer


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("idx") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format="wds", shard_size="5 samples"),
            progress=False)
    return dest


def test_each_wds_shard_gets_its_sample_index_in_dalis_format(store):
    entries = [s for split in read_manifest(str(store)).splits.values() for s in split.shards]
    assert len(entries) > 2
    for entry in entries:
        raw = (store / idx_name(entry.name)).read_bytes()
        assert entry.idx_sha256 == hashlib.sha256(raw).hexdigest()
        lines = raw.decode().splitlines()
        assert lines[0] == f"v1.2 {entry.samples}"
        for line in lines[1:]:  # ext offset size name, per member: the .cls and the .jpg
            fields = line.split()
            assert len(fields) == 8 and {fields[0], fields[4]} == {"cls", "jpg"}
            assert all(fields[i + 3].endswith("." + fields[i]) for i in (0, 4))
        with open(store / entry.name, "rb") as f:
            scanned = scan_tar(f, entry.samples)
        np.testing.assert_array_equal(idx_spans(raw, entry.samples, entry.bytes), scanned.spans)


def test_lmdb_shards_have_none(imagefolder_src, tmp_path):
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(tmp_path / "s"), format="lmdb"), progress=False)
    entries = [s for split in read_manifest(str(tmp_path / "s")).splits.values() for s in split.shards]
    assert entries and all(e.idx_sha256 is None for e in entries)
    assert not list((tmp_path / "s").glob("*.idx"))


def test_verify_names_a_changed_missing_or_wrong_index(store, tmp_path):
    damaged = tmp_path / "store"
    shutil.copytree(store, damaged)
    changed, missing, wrong = sorted(damaged.glob("train-*.idx"))[:3]
    for idx in (changed, wrong):
        text = idx.read_text()
        idx.write_text(text.replace(" 512 ", " 1024 ", 1))  # the first sample's first member, moved
        assert idx.read_text() != text
    missing.unlink()
    manifest = json.loads((damaged / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:  # as if the manifest had been written with it
        if entry["name"] == wrong.name.replace(".idx", ".tar"):
            entry["idx_sha256"] = hashlib.sha256(wrong.read_bytes()).hexdigest()
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(str(damaged))
    assert problems == [
        f"{changed.stem}.tar: {changed.name} sha256 {hashlib.sha256(changed.read_bytes()).hexdigest()[:16]}... "
        f"does not match the manifest's {hashlib.sha256((store / changed.name).read_bytes()).hexdigest()[:16]}...",
        f"{missing.stem}.tar: {missing.name} is missing",
        f"{wrong.stem}.tar: {wrong.name} does not index the shard as it is",
    ]


def test_a_reader_on_s3_reads_the_index_and_the_samples_only(imagefolder_src, tmp_path, monkeypatch):
    """Two samples of a shard read from S3: with its .idx, the tar's bytes requested are those two samples' (and
    the index, a few hundred bytes); from the same store without .idx in its manifest (written before them), the
    scan of the tar requests all of it. The samples are the same bytes both ways."""
    monkeypatch.setenv("MOTO_RECORDER_FILEPATH", str(tmp_path / "requests.jsonl"))
    server = MotoServer()
    with server.serving(buckets=("idx",)):
        s3fs.S3FileSystem.clear_instance_cache()
        url = "s3://idx/store"
        convert(ConvertOptions(src=str(imagefolder_src), dest=url, format="wds", shard_size="8 samples"),
                progress=False)
        entry = read_manifest(url).splits["train"].shards[1]
        first = 8  # shard 1's first sample is the split's 9th
        fs = s3fs.S3FileSystem()
        idx = fs.cat_file(f"idx/store/{idx_name(entry.name)}")
        sizes = {entry.name: entry.bytes, idx_name(entry.name): len(idx)}

        def requested(split_url: str) -> tuple[list, dict[str, int]]:
            requests.post(f"{server.endpoint}/moto-api/recorder/reset-recording").raise_for_status()
            requests.post(f"{server.endpoint}/moto-api/recorder/start-recording").raise_for_status()
            reader = make_reader(open_split(split_url, "train"))
            got = reader.read(np.array([first, first + 3]))
            requests.post(f"{server.endpoint}/moto-api/recorder/stop-recording").raise_for_status()
            log = requests.get(f"{server.endpoint}/moto-api/recorder/download-recording")
            gets = [json.loads(line) for line in log.text.splitlines() if line]
            return got, {name: sum(ranged(r, size) for r in gets if r["method"] == "GET"
                                   and r["url"].split("?")[0].endswith("/" + name))
                         for name, size in sizes.items()}

        with_idx, bytes_with = requested(url)
        spans = np.asarray(idx_spans(idx, entry.samples, entry.bytes))
        manifest = json.loads(fs.cat_file("idx/store/manifest.json"))
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                del shard["idx_sha256"]
        fs.pipe_file("idx/store/manifest.json", json.dumps(manifest).encode())
        scanned, bytes_without = requested(url)

    assert [(s.key, s.image) for s in with_idx] == [(s.key, s.image) for s in scanned]
    assert bytes_with[entry.name] == int((spans[[0, 3], 1] - spans[[0, 3], 0]).sum())
    assert bytes_with[idx_name(entry.name)] == len(idx) < entry.bytes / 20
    assert bytes_without[entry.name] >= entry.bytes and bytes_without[idx_name(entry.name)] == 0


def ranged(request: dict, whole: int) -> int:
    """Bytes a GET asked for: its Range header's, else the whole object's."""
    header = {k.lower(): v for k, v in request["headers"].items()}.get("range")
    if header is None:
        return whole
    start, _, end = header.removeprefix("bytes=").partition("-")
    return int(end) - int(start) + 1
