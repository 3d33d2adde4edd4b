"""Faults the campaign (bench/faults_data.py) found in conversion, each fixed and kept fixed here."""

from __future__ import annotations

import pytest

from shards import ConvertOptions, StoreError, convert, read_manifest, samples, verify


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
