"""The bad-input corpus: each file is converted correctly or lands in rejects.jsonl with its reason."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from shards import ConvertOptions, StoreError, convert, read_manifest, samples
from shards.keys import order_key, sample_key
from tests.test_shards_cli import SHARDTRAIN
from tests.test_shards_reader import decode, read_store

MAX_PIXELS = 150 * 150


def jpeg(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **kw)
    return out.getvalue()


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def rotated_jpeg() -> bytes:
    """40x20 stored pixels, left half red, with EXIF orientation 6 (display rotated 90 degrees)."""
    img = Image.new("RGB", (40, 20), "blue")
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(img, exif=exif.tobytes())


def make_corpus(root: Path) -> dict[str, str | None]:
    """Write the corpus under root/train/<class>/; returns relpath -> expected reject reason (None: kept)."""
    samples.make_imagefolder(root, per_class={"train": 2}, size=32, classes=["chelsea", "rocket"])
    good = root / "train" / "chelsea" / "chelsea_0000.jpg"
    odd = root / "train" / "odd"
    odd.mkdir()
    gray16 = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16).repeat(8, 0).repeat(8, 1))
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 8, 16))  # left half fully transparent red
    files = {
        "truncated.jpg": (good.read_bytes()[: good.stat().st_size // 2], "truncated"),
        "zero.jpg": (b"", "empty"),
        "random.jpg": (np.random.default_rng(0).bytes(3000), "not_an_image"),
        "cmyk.jpg": (jpeg(Image.new("CMYK", (24, 24), (0, 255, 255, 0))), None),
        "gray16.png": (png(gray16), None),
        "palette.png": (png(Image.open(good).convert("P", palette=Image.Palette.ADAPTIVE)), None),
        "rgba.png": (png(rgba), None),
        "rotated.jpg": (rotated_jpeg(), None),
        "huge.png": (png(Image.new("RGB", (200, 200), "green")), "too_large"),
        "with space ü.v2.jpg": (jpeg(Image.new("RGB", (20, 20), "white")), None),
        "with_space_ü_v2.jpg": (jpeg(Image.new("RGB", (20, 20), "black")), None),
        "copy.jpg": (good.read_bytes(), "duplicate"),
        "notes.txt": (b"not an input", "ignored"),
    }
    expected: dict[str, str | None] = {}
    for name, (data, reason) in files.items():
        (odd / name).write_bytes(data)
        if reason != "ignored":
            expected[f"train/odd/{name}"] = reason
    (odd / "broken.jpg").symlink_to(root / "nowhere.jpg")
    expected["train/odd/broken.jpg"] = "unreadable"
    for p in root.rglob("*.jpg"):
        expected.setdefault(p.relative_to(root).as_posix(), None)
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("corpus") / "src"
    return root, make_corpus(root)


def rejects_of(dest: Path) -> dict[str, dict]:
    lines = (dest / "rejects.jsonl").read_text().splitlines()
    return {r["path"]: r for r in map(json.loads, lines)}


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
def test_corpus_is_converted_or_rejected_with_its_reason(corpus, tmp_path, fmt):
    src, expected = corpus
    summary = convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), format=fmt, max_pixels=MAX_PIXELS,
                                     workers=2, shard_size="5samples"), progress=False)
    stored, rejects = read_store(tmp_path / "s"), rejects_of(tmp_path / "s")
    # Of two identical files, the one first in the store's sample order is kept and the other is the duplicate.
    kept, dropped = sorted(["train/odd/copy.jpg", "train/chelsea/chelsea_0000.jpg"],
                           key=lambda p: order_key(sample_key(p), 0))
    expected = {**expected, kept: None, dropped: "duplicate"}
    assert {p: r["reason"] for p, r in rejects.items()} == {p: r for p, r in expected.items() if r}
    assert {k for k in stored} == {sample_key(p) for p, r in expected.items() if r is None}
    assert summary.added + summary.rejected == len(expected) == len(stored) + len(rejects)
    assert read_manifest(str(tmp_path / "s")).rejects == len(rejects)
    assert rejects[dropped]["of"] == sample_key(kept)
    assert all(r["detail"] and r["version"] == 1 for r in rejects.values())
    for rel, reason in expected.items():
        if reason is None:
            img = decode(stored[sample_key(rel)]["image"])
            assert img.mode in ("RGB", "L"), rel


def test_odd_modes_become_correct_8bit_rgb(corpus, tmp_path):
    src, _ = corpus
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), max_pixels=MAX_PIXELS, workers=1),
            progress=False)
    stored = read_store(tmp_path / "s")

    def pixels(name: str) -> tuple[str, np.ndarray]:
        sample = stored[sample_key(f"train/odd/{name}")]
        img = decode(sample["image"])
        assert img.mode == "RGB", name
        return sample["ext"], np.asarray(img)

    ext, gray = pixels("gray16.png")
    assert ext == "png" and gray[0, 0].tolist() == [0, 0, 0] and gray[0, 8].tolist() == [100] * 3
    assert gray[8, 0].tolist() == [255] * 3 and gray[8, 8].tolist() == [7] * 3  # scaled, not clipped
    ext, rgba = pixels("rgba.png")
    assert ext == "png" and rgba[0, 0].tolist() == [255, 255, 255] and rgba[0, 15].tolist() == [0, 0, 255]
    ext, cmyk = pixels("cmyk.jpg")
    assert ext == "jpg" and abs(cmyk[12, 12].astype(int) - [255, 0, 0]).max() < 10  # CMY(0,255,255) is red
    ext, palette = pixels("palette.png")
    original = np.asarray(Image.open(src / "train/odd/palette.png").convert("RGB"))
    assert ext == "png" and (palette == original).all()


def test_exif_orientation_kept_in_bytes_or_applied_when_shrunk(corpus, tmp_path):
    src, _ = corpus
    key = sample_key("train/odd/rotated.jpg")
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "kept"), max_pixels=MAX_PIXELS, workers=1),
            progress=False)
    kept = read_store(tmp_path / "kept")[key]["image"]
    assert kept == (src / "train/odd/rotated.jpg").read_bytes()  # tag stays: readers apply it
    upright = np.asarray(ImageOps.exif_transpose(decode(kept)))
    assert upright.shape[:2] == (40, 20)
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "small"), max_pixels=MAX_PIXELS, max_side=16,
                           workers=1), progress=False)
    stored = read_store(tmp_path / "small")
    shrunk = decode(stored[key]["image"])
    assert shrunk.size == (8, 16) and shrunk.getexif().get(0x0112, 1) == 1  # upright, no tag left
    for y in (2, 13):  # the same colours as the upright original at the same place
        assert abs(np.asarray(shrunk)[y, 4].astype(int) - upright[y * 40 // 16, 10]).max() < 40
    assert all(max(decode(s["image"]).size) <= 16 for s in stored.values())
    assert rejects_of(tmp_path / "small")["train/odd/truncated.jpg"]["reason"] == "truncated"  # scaled decode too


def test_on_error_fail_stops_with_one_line_naming_the_file(corpus, tmp_path):
    src, _ = corpus
    with pytest.raises(StoreError) as err:
        convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), on_error="fail", workers=2), progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("train/odd/") and ": " in message
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_unreadable_file(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 1}, size=32, classes=["chelsea"])
    locked = src / "train" / "chelsea" / "locked.jpg"
    shutil.copy(samples.PHOTOS_DIR / "rocket.jpg", locked)
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        pytest.skip("running as root: chmod 0 does not make a file unreadable")
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert rejects_of(tmp_path / "s")["train/chelsea/locked.jpg"]["reason"] == "unreadable"


def test_special_files_are_rejects_never_opened(tmp_path, monkeypatch):
    """A FIFO named like an image hung convert in open(), waiting for a writer; a device behind a symlink
    would be read to its end (never, for /dev/zero). The console script runs under a timeout, so that a
    regression fails here rather than hangs."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea", "rocket"])
    good = {p.relative_to(src).as_posix() for p in src.rglob("*.jpg")}
    chelsea = src / "train" / "chelsea"
    os.mkfifo(chelsea / "pipe.jpg")
    (chelsea / "to_pipe.jpg").symlink_to(chelsea / "pipe.jpg")
    (chelsea / "null.jpg").symlink_to(os.devnull)
    monkeypatch.chdir(chelsea)  # a socket's path has a length limit: bind it relative to its folder
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.jpg")
    dest = tmp_path / "s"
    run = subprocess.Popen([SHARDTRAIN, "convert", str(src), str(dest), "--workers", "2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # its decoding workers too, blocked on the FIFO
        run.communicate()
        pytest.fail("convert hung on a special file")
    assert run.returncode == 0, stderr
    details = {p: (r["reason"], r["detail"]) for p, r in rejects_of(dest).items()}
    assert details == {
        "train/chelsea/pipe.jpg": ("not_a_file", "a FIFO (named pipe), not a regular file"),
        "train/chelsea/to_pipe.jpg": ("not_a_file", "a FIFO (named pipe), not a regular file"),
        "train/chelsea/null.jpg": ("not_a_file", "a character device, not a regular file"),
        "train/chelsea/sock.jpg": ("not_a_file", "a socket, not a regular file"),
    }
    assert set(read_store(dest)) == {sample_key(p) for p in good}

    # The nightly flow's append: tonight's new FIFO is a new reject, last night's are not listed again.
    os.mkfifo(src / "train" / "rocket" / "tonight.jpg")
    summary = convert(ConvertOptions(src=str(src), dest=str(dest), append=True, workers=1), progress=False)
    assert (summary.added, summary.rejected, summary.unchanged) == (0, 1, len(good) + 4)
    assert rejects_of(dest)["train/rocket/tonight.jpg"]["reason"] == "not_a_file" and len(rejects_of(dest)) == 5


@pytest.mark.timeout(60)  # a regression hangs in open(): fail it
def test_yolo_special_label_and_data_yaml(tmp_path):
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 2}, size=64)
    label = src / "labels" / "train" / "img_0000.txt"
    label.unlink()
    os.mkfifo(label)
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert rejects_of(tmp_path / "s")["images/train/img_0000.jpg"] == {
        "path": "images/train/img_0000.jpg", "reason": "not_a_file", "version": 1,
        "detail": "label labels/train/img_0000.txt: a FIFO (named pipe), not a regular file",
        "sha1": hashlib.sha1((src / "images/train/img_0000.jpg").read_bytes()).hexdigest()}

    # a stored sample's label that became a FIFO: a reject that says the stored sample stays
    label = src / "labels" / "train" / "img_0001.txt"
    stored = read_store(tmp_path / "s")
    label.unlink()
    os.mkfifo(label)
    assert convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), append=True, workers=1),
                   progress=False).rejected == 1
    key = sample_key("images/train/img_0001.jpg")
    assert rejects_of(tmp_path / "s")["images/train/img_0001.jpg"]["detail"] == (
        f"label labels/train/img_0001.txt: a FIFO (named pipe), not a regular file (the stored sample {key} is kept)")
    assert read_store(tmp_path / "s") == stored

    data_yaml = src / "data.yaml"
    data_yaml.unlink()
    os.mkfifo(data_yaml)
    with pytest.raises(StoreError, match=r"^yolo layout: .*data\.yaml is a FIFO \(named pipe\), not a regular file$"):
        convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s2"), workers=1), progress=False)


@pytest.mark.parametrize(("names", "problem"), [
    ("[coin, null, ring]", "entry 1 is None, not a class name"),  # as YAML reads an empty entry
    ("[coin, {x: 1}]", "entry 1 is {'x': 1}, not a class name"),
    ("[coin, true]", "entry 1 is True, not a class name"),
    ("[coin, ring, coin]", "has 'coin' more than once: each class id needs its own name"),
])
def test_yolo_names_that_are_no_class_names_are_refused(tmp_path, names, problem):
    """Before, they became the classes "None", "{'x': 1}" and "True", and a name twice two classes of one name."""
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 2}, size=64)
    (src / "data.yaml").write_text(f"names: {names}\n")
    with pytest.raises(StoreError) as e:
        convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert str(e.value) == f"yolo layout: {src / 'data.yaml'} `names` {problem}"


def test_yolo_bad_labels(tmp_path):
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 8}, size=64)
    labels = src / "labels" / "train"
    bad = {
        "img_0000": ("0 0.5 0.5 0.2\n", "bad_label"),  # 4 fields
        "img_0001": ("0 0.5 half 0.2 0.2\n", "bad_label"),
        "img_0002": ("1 0.5 0.5 1.5 0.2\n", "bad_label"),  # outside [0, 1]
        "img_0003": ("1 0.5 0.5 0.0 0.2\n", "bad_label"),  # empty box
        "img_0004": ("0 0.5 0.5 0.2 0.2\n99 0.5 0.5 0.2 0.2\n", "unknown_class"),
        "img_0005": ("", None),  # empty label file: no objects
    }
    for stem, (text, _) in bad.items():
        (labels / f"{stem}.txt").write_text(text)
    (labels / "img_0006.txt").unlink()  # missing label file: no objects
    (src / "data.yaml").write_text("names: [" + ", ".join(samples.class_names()) + "]\n")  # list form
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), format="lmdb", workers=1), progress=False)
    rejects, stored = rejects_of(tmp_path / "s"), read_store(tmp_path / "s")
    assert {p: r["reason"] for p, r in rejects.items()} == {
        f"images/train/{stem}.jpg": reason for stem, (_, reason) in bad.items() if reason
    }
    for stem in ("img_0005", "img_0006"):
        assert stored[sample_key(f"images/train/{stem}.jpg")]["boxes"] == []
    assert len(stored[sample_key("images/train/img_0007.jpg")]["boxes"]) >= 1


@pytest.mark.parametrize("labels", [None, "Labels", "label"])
def test_a_yolo_set_without_any_label_file_is_refused_naming_where_they_were_looked_for(tmp_path, labels):
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 3}, size=64)
    if labels:
        (src / "labels").rename(src / labels)
    else:
        shutil.rmtree(src / "labels")
    hint = f"; there is {labels}/: YOLO's folder is labels/" if labels else ""
    with pytest.raises(StoreError) as e:
        convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert str(e.value) == (f"yolo layout: none of the 3 images has a label file: looked in {src}/labels/ "
                            f"(images/<split>/NAME.jpg -> labels/<split>/NAME.txt){hint}")
    (src / "labels" / "train").mkdir(parents=True)
    (src / "labels" / "train" / "img_0001.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # the others: backgrounds
    summary = convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert (summary.added, summary.rejected) == (3, 0)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height gray pixels, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray: a byte per pixel if decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_bomb_is_rejected_naming_max_pixels_and_a_larger_one_is_honoured(tmp_path):
    """Over twice Pillow's own limit, Pillow refused the image before our check, quoting its limit;
    and a --max-pixels above Pillow's was not honoured."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 1}, size=32, classes=["chelsea"])
    (src / "train" / "chelsea" / "bomb.png").write_bytes(png_declaring(20_000, 10_000))
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    assert rejects_of(tmp_path / "s")["train/chelsea/bomb.png"]["detail"] == "200000000 pixels > max_pixels 89478485"

    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "big"), max_pixels=250_000_000, workers=1),
            progress=False)
    # Within the limit: decoded, and its missing pixel data is what rejects it.
    assert rejects_of(tmp_path / "big")["train/chelsea/bomb.png"]["reason"] == "truncated"
