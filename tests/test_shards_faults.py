"""Faults the campaign (tests/faults/data_faults.py) found in conversion, each fixed and kept fixed here."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from shards import ConvertOptions, StoreError, convert, read_manifest, samples, verify
from shards.keys import sample_key
from tests.test_shards_reader import decode, read_store


def test_same_command_after_a_kill_past_the_manifest_is_a_no_op(tmp_path):
    """A kill can land after manifest.json is written (while the CLI prints its summary and exits):
    rerunning the same command must finish, not ask for --append; a different source still must."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3}, size=32, classes=["chelsea"])
    (src / "train" / "chelsea" / "zero.jpg").write_bytes(b"")
    opts = ConvertOptions(src=str(src), dest=str(tmp_path / "s"), shard_size="2samples", workers=1)
    convert(opts, progress=False)
    before = (tmp_path / "s" / "manifest.json").read_bytes()

    summary = convert(opts, progress=False)
    assert (summary.added, summary.rejected, summary.unchanged, summary.version) == (0, 0, 4, 1)
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before

    with pytest.raises(StoreError, match="pass --append"):
        convert(opts.model_copy(update={"shard_size": "3samples"}), progress=False)
    samples.make_imagefolder(src, per_class={"train": 1}, size=32, classes=["chelsea"], start=10)
    with pytest.raises(StoreError, match="pass --append"):
        convert(opts, progress=False)
    assert read_manifest(str(tmp_path / "s")).totals.samples == 3


@pytest.mark.parametrize("damage", ["truncate", "flip_key"])
def test_verify_catches_a_damaged_index(tmp_path, damage):
    """--append reads _index/ to know what is stored; a damaged index must not pass verify."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3}, size=32, classes=["chelsea"])
    dest = tmp_path / "s"
    convert(ConvertOptions(src=str(src), dest=str(dest), shard_size="2samples", workers=1), progress=False)
    assert verify(str(dest), deep=True) == []
    index = dest / "_index" / "train-000001.tar.json"
    text = index.read_text()
    if damage == "truncate":
        index.write_text(text[: len(text) // 2])
    else:
        index.write_text(text.replace('"key":"train_chelsea', '"key":"train_chelsEa', 1))
    problems = verify(str(dest), deep=True)
    assert problems and all(p.startswith("train-000001.tar: ") for p in problems), problems


def test_a_file_name_that_is_not_utf8_converts_and_appends(tmp_path):
    """Linux names are bytes: b"caf\\xe9.jpg" (Latin-1) must convert like any other name, its reject record
    must round-trip through rejects.jsonl, and a rerun/--append must derive the same key from what it stored."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea"])
    folder = os.fsencode(src / "train" / "chelsea")
    good = folder + b"/caf\xe9.jpg"
    os.rename(folder + b"/chelsea_0000.jpg", good)
    with open(folder + b"/z\xe9ro.jpg", "wb"):
        pass  # empty: a reject whose path is not UTF-8
    rel_good, rel_empty = "train/chelsea/caf\udce9.jpg", "train/chelsea/z\udce9ro.jpg"  # os.fsdecode's names
    opts = ConvertOptions(src=str(src), dest=str(tmp_path / "s"), shard_size="1samples", workers=1)
    summary = convert(opts, progress=False)
    assert (summary.added, summary.rejected) == (2, 1)
    stored = read_store(tmp_path / "s")
    with Image.open(good) as img:
        assert (np.asarray(decode(stored[sample_key(rel_good)]["image"])) == np.asarray(img)).all()
    lines = (tmp_path / "s" / "rejects.jsonl").read_bytes().decode("utf-8").splitlines()  # valid UTF-8
    assert [(r["path"], r["reason"]) for r in map(json.loads, lines)] == [(rel_empty, "empty")]
    index = json.loads((tmp_path / "s" / "_index" / "train-000000.tar.json").read_bytes())
    assert index["items"][0]["path"] == rel_good
    assert verify(str(tmp_path / "s"), deep=True) == []

    assert convert(opts, progress=False).unchanged == 3  # the same command: a no-op, keys match
    samples.make_imagefolder(src, per_class={"train": 1}, size=32, classes=["chelsea"], start=10, seed=1)
    again = convert(opts.model_copy(update={"append": True}), progress=False)
    assert (again.added, again.rejected, again.unchanged) == (1, 0, 3)
    assert read_manifest(str(tmp_path / "s")).totals.samples == 3


def webp(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "WEBP", **kw)
    return out.getvalue()


def test_lossless_webp_is_stored_lossless(tmp_path):
    """The store format keeps lossless sources lossless: a lossless WebP that must be re-encoded (alpha, or
    shrunk by --max-side) becomes PNG with exact pixels; a lossy one (VP8X + ALPH + "VP8 ") stays JPEG."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 1}, size=32, classes=["chelsea"])
    photo = Image.open(samples.photo_paths()[0]).convert("RGB").resize((32, 32))
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((32, 32)))
    folder = src / "train" / "chelsea"
    (folder / "alpha_lossless.webp").write_bytes(webp(rgba, lossless=True, exact=True))
    (folder / "rgb_lossless.webp").write_bytes(webp(photo, lossless=True))
    (folder / "alpha_lossy.webp").write_bytes(webp(rgba, quality=90))
    on_white = np.asarray(Image.alpha_composite(Image.new("RGBA", (32, 32), "white"), rgba).convert("RGB"))

    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    stored = read_store(tmp_path / "s")
    sample = stored[sample_key("train/chelsea/alpha_lossless.webp")]
    assert sample["ext"] == "png"
    assert np.abs(np.asarray(decode(sample["image"]), dtype=int) - on_white).max() <= 1  # compositing rounds
    assert stored[sample_key("train/chelsea/rgb_lossless.webp")]["ext"] == "webp"  # bytes kept
    assert stored[sample_key("train/chelsea/alpha_lossy.webp")]["ext"] == "jpg"

    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "small"), max_side=16, workers=1), progress=False)
    shrunk = read_store(tmp_path / "small")[sample_key("train/chelsea/rgb_lossless.webp")]
    assert shrunk["ext"] == "png" and decode(shrunk["image"]).size == (16, 16)


def test_append_refuses_a_damaged_index(tmp_path):
    """An unreadable _index/ file used to be skipped, and --append re-added that shard's inputs as duplicates."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3}, size=32, classes=["chelsea"])
    dest = tmp_path / "s"
    opts = ConvertOptions(src=str(src), dest=str(dest), shard_size="2samples", workers=1, append=True)
    convert(opts, progress=False)
    index = dest / "_index" / "train-000001.tar.json"
    index.write_bytes(index.read_bytes()[:-7])
    before = (dest / "manifest.json").read_bytes()
    samples.make_imagefolder(src, per_class={"train": 1}, size=32, classes=["chelsea"], start=10, seed=1)
    with pytest.raises(StoreError) as err:
        convert(opts, progress=False)
    message = str(err.value)
    assert "\n" not in message and "train-000001.tar" in message and "shardtrain verify" in message
    assert (dest / "manifest.json").read_bytes() == before
    assert len(read_store(dest)) == 3


def test_verify_catches_a_changed_value_inside_an_index(tmp_path):
    """A bit flip inside a JSON value leaves a valid index; the manifest's index_sha256 catches it."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3}, size=32, classes=["chelsea"])
    dest = tmp_path / "s"
    convert(ConvertOptions(src=str(src), dest=str(dest), shard_size="2samples", workers=1), progress=False)
    assert verify(str(dest)) == []
    index = dest / "_index" / "train-000000.tar.json"
    data = json.loads(index.read_bytes())
    sha1 = data["items"][0]["sha1"]
    data["items"][0]["sha1"] = ("0" if sha1[0] != "0" else "1") + sha1[1:]  # still a valid index
    index.write_bytes(json.dumps(data, separators=(",", ":")).encode())
    problems = verify(str(dest))
    assert len(problems) == 1 and problems[0].startswith("train-000000.tar: _index/train-000000.tar.json sha256")


@pytest.mark.parametrize("cut", [0.1, 0.25, 0.5, 0.9])
def test_verify_reports_a_truncated_lmdb_shard_without_opening_it(tmp_path, cut):
    """Mapping a truncated LMDB file can kill the process (SIGBUS): verify must name it, and live."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 6}, size=32, classes=["chelsea"])
    dest = tmp_path / "s"
    convert(ConvertOptions(src=str(src), dest=str(dest), format="lmdb", workers=1), progress=False)
    shard = next(dest.glob("train-*.lmdb"))
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * cut)])
    for deep in (False, True):
        problems = verify(str(dest), deep=deep)
        assert problems and all(p.startswith(f"{shard.name}: ") for p in problems)
        assert any("manifest says" in p for p in problems)


@pytest.mark.parametrize("damage", ["changed", "missing"])
@pytest.mark.parametrize("command", ["append", "rerun"])
def test_append_and_rerun_check_the_indexes_against_the_manifest(tmp_path, damage, command):
    """A valid index whose content changed (a sha1 edited) passed read_indexes: --append and the same command
    again took its word for what the shard holds. Its index_sha256 in the manifest now says otherwise."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3}, size=32, classes=["chelsea"])
    dest = tmp_path / "s"
    opts = ConvertOptions(src=str(src), dest=str(dest), shard_size="2samples", workers=1)
    convert(opts, progress=False)
    index = dest / "_index" / "train-000000.tar.json"
    if damage == "missing":
        index.unlink()
    else:
        data = json.loads(index.read_bytes())
        data["items"][0]["key"] = data["items"][1]["key"]  # still a valid index, now naming a sample twice
        index.write_bytes(json.dumps(data, separators=(",", ":")).encode())
    before = (dest / "manifest.json").read_bytes()
    if command == "append":
        samples.make_imagefolder(src, per_class={"train": 1}, size=32, classes=["chelsea"], start=10, seed=1)
    with pytest.raises(StoreError) as err:
        convert(opts.model_copy(update={"append": command == "append"}), progress=False)
    message = str(err.value)
    assert message.startswith(f"{index} {'is missing' if damage == 'missing' else 'does not match the manifest'}")
    assert "\n" not in message and "shardtrain verify" in message
    assert (dest / "manifest.json").read_bytes() == before
