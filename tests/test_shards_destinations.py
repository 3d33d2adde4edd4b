"""Where `convert` writes: a DEST that is a file, someone else's folder, or not writable is refused
with one line before any work; a DEST holding an interrupted conversion of ours still resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shards import ConvertOptions, StoreError, convert, read_manifest, samples, verify

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


def options(src: Path, dest: str | Path, **kw) -> ConvertOptions:
    return ConvertOptions(src=str(src), dest=str(dest), shard_size="4samples", workers=1, **kw)


@pytest.fixture
def src(tmp_path) -> Path:
    return samples.make_imagefolder(tmp_path / "src", per_class={"train": 6}, size=32, classes=["chelsea"])


def test_a_folder_of_other_things_is_refused_and_left_alone(src, tmp_path):
    dest = tmp_path / "photos"
    (dest / "2024").mkdir(parents=True)
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(StoreError) as err:
        convert(options(src, dest), progress=False)
    message = str(err.value)
    assert "\n" not in message and str(dest) in message and "no manifest.json" in message
    assert "2024, notes.txt" in message
    assert sorted(p.name for p in dest.iterdir()) == ["2024", "notes.txt"]


def test_an_interrupted_conversion_of_ours_still_resumes(src, tmp_path):
    dest = tmp_path / "store"
    convert(options(src, dest), progress=False)
    clean = read_manifest(str(dest))
    # As a kill leaves it: no manifest yet, a shard being built, temp files of the last writes.
    (dest / "manifest.json").unlink()
    (dest / "train-000001.tar").unlink()
    (dest / ".train-000001.tar.partial").write_bytes(b"half a shard")
    (dest / "rejects.jsonl.tmp").write_bytes(b"")
    (dest / "train-000001.idx.tmp").write_bytes(b"v1.2")  # killed while writing a shard's .idx
    (dest / "_index" / "train-000001.tar.json.tmp").write_bytes(b"{")
    (dest / "_index" / "train-000001.tar.json").unlink()
    summary = convert(options(src, dest), progress=False)
    assert summary.added == 6
    assert read_manifest(str(dest)).splits == clean.splits
    assert verify(str(dest)) == []


def test_a_file_as_dest_says_so(src, tmp_path):
    dest = tmp_path / "store.tar"
    dest.write_bytes(b"not a folder")
    with pytest.raises(StoreError, match=f"^DEST {dest} is a file, not a folder"):
        convert(options(src, dest), progress=False)
    with pytest.raises(StoreError, match=f"^{dest} is a file, not a shard store"):
        read_manifest(str(dest))  # what inspect and verify read first


def test_an_unwritable_dest_is_refused_before_decoding(src, tmp_path, as_user):
    dest = tmp_path / "readonly"
    dest.mkdir()
    dest.chmod(0o555)
    result = subprocess.run([*as_user, SHARDTRAIN, "convert", str(src), str(dest), "--workers", "1"],
                            capture_output=True, text=True, timeout=300)
    # One line, naming DEST: no layout line, no progress, no internal .partial file.
    assert (result.returncode, result.stderr) == (1, f"error: cannot write to {dest}: Permission denied\n")
    assert list(dest.iterdir()) == []


def test_an_unwritable_s3_dest_is_refused_before_decoding(src, s3_bucket):
    dest = s3_bucket.replace("s3://", "s3://no-such-") + "/store"
    with pytest.raises(StoreError, match=f"^cannot write to {dest}: "):
        convert(options(src, dest), progress=False)


def test_a_foreign_s3_prefix_is_refused(src, s3_bucket):
    import s3fs

    s3fs.S3FileSystem().pipe_file(f"{s3_bucket}/store/report.csv", b"a,b\n")
    with pytest.raises(StoreError, match="not empty and holds no shard store .* report.csv"):
        convert(options(src, f"{s3_bucket}/store"), progress=False)
