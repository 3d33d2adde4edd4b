"""What `convert` reads of SRC: symlink loops are never followed and unreadable folders are reported,
each named, rather than changing the layout or vanishing silently."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from shards import ConvertOptions, convert, read_manifest, samples

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


def test_a_symlink_loop_in_a_class_folder_is_skipped_and_the_labels_kept(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3}, size=32, classes=["chelsea", "rocket"])
    flat = src / "train"  # SRC/<class>/...
    (flat / "chelsea" / "again").symlink_to(flat / "chelsea", target_is_directory=True)
    (flat / "rocket" / "up").symlink_to(flat, target_is_directory=True)
    summary = convert(ConvertOptions(src=str(flat), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert (summary.layout, summary.added, summary.rejected) == ("imagefolder", 6, 0)
    assert read_manifest(str(tmp_path / "s")).classes == ["chelsea", "rocket"]
    assert not (tmp_path / "s" / "rejects.jsonl").read_text()
    assert summary.skipped == ["chelsea/again: a symlink loop back to chelsea, not followed",
                               f"rocket/up: a symlink loop back to {flat}, not followed"]

    result = CliRunner().invoke(app, ["convert", str(flat), str(tmp_path / "cli"), "--workers", "1"])
    assert result.exit_code == 0, result.stderr
    assert "warning: skipped chelsea/again: a symlink loop back to chelsea, not followed" in result.stderr
    assert "layout: imagefolder" in result.stderr


def test_photos_in_formats_convert_does_not_read_are_counted_and_named(tmp_path):
    # a folder of a phone's HEICs converted to nothing without a word; other files (notes, labels) stay unnamed
    flat = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3}, size=32, flat=True,
                                    classes=["chelsea", "rocket"])
    for name in ("chelsea/IMG_0001.HEIC", "chelsea/IMG_0002.heic", "rocket/raw.dng"):
        (flat / name).write_bytes(b"\0" * 64)
    (flat / "rocket" / "notes.txt").write_text("shot on a phone")
    summary = convert(ConvertOptions(src=str(flat), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert summary.added + summary.rejected == 6
    assert summary.skipped == [
        "chelsea/IMG_0001.HEIC and 2 more: photos in formats convert does not read (.heic 2, .dng 1); save them as "
        "JPEG (or another of .jpg, .jpeg, .jfif, .jpe, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp, .gif) to convert "
        "them"]


def test_jpegs_by_their_other_names_convert_and_hidden_images_are_named(tmp_path):
    # .jfif and .jpe (what browsers save) are JPEGs; a class of hidden files alone would vanish without a word
    flat = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, flat=True,
                                    classes=["chelsea", "rocket"])
    jpeg = next((flat / "chelsea").glob("*.jpg")).read_bytes()
    (flat / "saved").mkdir()
    for name, quality in (("a.JFIF", 50), ("b.jpe", 60)):  # not duplicates of the class folders' images
        Image.open(io.BytesIO(jpeg)).save(flat / "saved" / name, format="JPEG", quality=quality)
    for name in ("rocket/._IMG_1.jpg", "rocket/.IMG_2.jpg"):
        (flat / name).write_bytes(jpeg)
    (flat / ".Trash").mkdir()
    (flat / ".Trash" / "old.jpg").write_bytes(jpeg)
    summary = convert(ConvertOptions(src=str(flat), dest=str(tmp_path / "s"), workers=1, val_fraction=0),
                      progress=False)
    assert read_manifest(str(tmp_path / "s")).classes == ["chelsea", "rocket", "saved"]
    assert (summary.added, summary.rejected) == (6, 0)
    assert summary.skipped == ["rocket/.IMG_2.jpg and 1 more: hidden files (a name starting with '.', as macOS's ._ "
                               "copies), not read; rename them to convert them"]


def test_loops_through_two_symlinks_end(tmp_path):
    """a/to_b -> b and b/to_a -> a: each path is followed until it would enter a folder it is already inside."""
    src = samples.make_unlabeled(tmp_path / "src", size=32)
    a, b = src / "a", src / "b"
    for folder, image in ((a, "chelsea"), (b, "rocket")):
        folder.mkdir()
        (folder / f"{image}.jpg").write_bytes((samples.PHOTOS_DIR / f"{image}.jpg").read_bytes())
    (a / "to_b").symlink_to(b, target_is_directory=True)
    (b / "to_a").symlink_to(a, target_is_directory=True)
    summary = convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert summary.skipped == ["a/to_b/to_a: a symlink loop back to a, not followed",
                               "b/to_a/to_b: a symlink loop back to b, not followed"]
    rejects = [json.loads(line) for line in (tmp_path / "s" / "rejects.jsonl").read_text().splitlines()]
    # Each photo is reached by two paths, as through any symlinked folder: one is stored, the other is the
    # duplicate; nothing deeper.
    rejected = {r["path"] for r in rejects}
    pairs = [{"a/chelsea.jpg", "b/to_a/chelsea.jpg"}, {"b/rocket.jpg", "a/to_b/rocket.jpg"}]
    assert len(rejected) == 2 and all(len(pair & rejected) == 1 for pair in pairs), rejected
    assert {r["reason"] for r in rejects} == {"duplicate"} and summary.added == 32 + 2


def test_an_unreadable_folder_is_reported(tmp_path, as_user):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea", "rocket"])
    (src / "train" / "rocket").chmod(0)
    try:
        result = subprocess.run([*as_user, SHARDTRAIN, "convert", str(src), str(tmp_path / "s"), "--workers", "1"],
                                capture_output=True, text=True, timeout=300)
    finally:
        (src / "train" / "rocket").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert "warning: skipped train/rocket: cannot read the folder (Permission denied)" in result.stderr
    assert read_manifest(str(tmp_path / "s")).classes == ["chelsea"]
