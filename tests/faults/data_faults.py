"""The data faults of the campaign (tests/faults/test_campaign.py::test_data): kill -9 of `shardtrain convert` and of
`--append`, a corpus of malformed inputs, and corrupted stores, verified and trained on.

    run(work, kills, seed) -> flat figures (keys in README of docs/RELIABILITY.md's data section)

Conversions run the real console script in their own process group. Two shortcuts, both the same code
the user's command runs: the rerun after a kill calls `shards.convert` in this process (the console
script's start-up, ~10 s on 2 shared cores, is not what is tested), and verify runs `shards.cli`'s typer
app in a child process (the `verify` command without the root CLI's torch and Prefect imports); a
child, because a damaged LMDB file can crash the process that opens it.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import yaml
from PIL import Image, ImageOps

from shards import ConvertOptions, convert, read_manifest, samples, verify
from shards.keys import sample_key  # the key rule of docs/store-format.md

PYTHON = sys.executable
SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))
SHARDS_CLI = [PYTHON, "-c", "from shards.cli import app; app(prog_name='shardtrain')"]
FORMATS = ("wds", "lmdb")
SHARD_SIZE = "8samples"
WORKERS = 2
# Root reads files whatever their mode: the bad-input conversions run without the capabilities that
# let it, so a chmod 0 file is unreadable to them as to any user.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def run(work: Path, kills: int, seed: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    figures = conversion_kills(work / "kills", kills, rng)
    figures |= bad_inputs(work / "bad", rng)
    figures |= corrupt_stores(work / "corrupt", kills, rng)
    figures |= damaged_training(work / "train", rng)
    return figures


# ---- what a store holds ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    key: str
    ext: str
    image: bytes
    meta: dict  # {"cls": i} | {"boxes": [...], "labels": [...]} | {}


def read_samples(dest: Path) -> list[Stored]:
    """Every sample of the store, read with tarfile / lmdb from docs/store-format.md alone."""
    manifest = read_manifest(str(dest))
    out = []
    for split in manifest.splits.values():
        for shard in split.shards:
            reader = tar_samples if manifest.format == "wds" else lmdb_samples
            out += reader(dest / shard.name)
    return out


def tar_samples(path: Path) -> list[Stored]:
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            member = tar.extractfile(info)
            assert member is not None, f"{path}: {info.name} is not a regular file"
            members.setdefault(key, {})[ext] = member.read()
    out = []
    for key, m in members.items():
        ext = next(e for e in ("jpg", "png", "webp") if e in m)
        meta = {"cls": int(m["cls"])} if "cls" in m else json.loads(m["json"]) if "json" in m else {}
        out.append(Stored(key, ext, m[ext], meta))
    return out


def lmdb_samples(path: Path) -> list[Stored]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    out = []
    try:
        with env.begin() as txn:
            length = txn.get(b"__len__")
            assert length is not None, f"{path}: no __len__ key"
            for i in range(int(length)):
                value = txn.get(b"%08d" % i)
                assert value is not None, f"{path}: sample {i} of {int(length)} missing"
                (n,) = struct.unpack(">I", value[:4])
                meta = json.loads(value[4:4 + n])
                out.append(Stored(meta.pop("key"), meta.pop("ext"), bytes(value[4 + n:]), meta))
    finally:
        env.close()
    return out


def read_rejects(dest: Path) -> list[dict]:
    path = dest / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- 1. conversion kills ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """A source's expected store: key -> (sha1 of the source bytes, class), and relpath -> reject reason."""

    samples: dict[str, tuple[str, int]]
    rejects: dict[str, str]


def expected_store(src: Path, rejects: dict[str, str]) -> Expected:
    import hashlib

    classes = sorted({p.parent.name for p in src.rglob("*.jpg")})
    kept = {}
    for p in sorted(src.rglob("*.jpg")):
        rel = p.relative_to(src).as_posix()
        if rel not in rejects:
            kept[sample_key(rel)] = (hashlib.sha1(p.read_bytes()).hexdigest(), classes.index(p.parent.name))
    return Expected(kept, rejects)


def store_problems(dest: Path, expected: Expected) -> list[str]:
    """Why the store at `dest` is not exactly the expected one ([] when it is)."""
    import hashlib

    problems = [f"verify --deep: {p}" for p in verify(str(dest), deep=True)]
    stored = read_samples(dest)
    counts = Counter(s.key for s in stored)
    problems += [f"{k} stored {n} times" for k, n in counts.items() if n > 1]
    problems += [f"{k} missing" for k in expected.samples.keys() - counts.keys()]
    problems += [f"{k} stored but not an input" for k in counts.keys() - expected.samples.keys()]
    for s in stored:
        want = expected.samples.get(s.key)
        if want and (hashlib.sha1(s.image).hexdigest(), s.meta.get("cls")) != want:
            problems.append(f"{s.key}: bytes or class differ from the source")
    rejects = read_rejects(dest)
    paths = Counter(r["path"] for r in rejects)
    problems += [f"{p} rejected {n} times" for p, n in paths.items() if n > 1]
    if {r["path"]: r["reason"] for r in rejects} != expected.rejects:
        problems.append(f"rejects {sorted(paths)} != expected {sorted(expected.rejects)}")
    manifest = read_manifest(str(dest))
    if manifest.totals.samples != len(expected.samples) or manifest.rejects != len(rejects):
        problems.append(f"manifest counts {manifest.totals.samples} samples, {manifest.rejects} rejects")
    problems += [f"left over: {p.name}" for p in dest.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    return problems


def start_convert(src: Path, dest: Path, fmt: str, append: bool, log: Path) -> subprocess.Popen:
    cmd = [SHARDTRAIN, "convert", str(src), str(dest), "--format", fmt, "--shard-size", SHARD_SIZE,
           "--workers", str(WORKERS), *(["--append"] if append else [])]
    out = open(log, "w")
    # its own session, so a kill of the group reaches the pool workers too
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_started(proc: subprocess.Popen, log: Path, timeout: float = 180) -> float:
    """When the conversion proper begins: the CLI prints its `layout:` line after the imports."""
    deadline = time.monotonic() + timeout
    while "layout:" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"convert did not start: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.01)
    return time.monotonic()


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def manifest_stamp(dest: Path) -> int | None:
    path = dest / "manifest.json"
    return path.stat().st_mtime_ns if path.exists() else None


def timed_convert(src: Path, dest: Path, fmt: str, append: bool) -> float:
    """Seconds from a whole conversion's `layout:` line to its manifest.json: the kill window (after the
    manifest only the summary and the interpreter's exit are left, seconds that would draw most kills)."""
    log = dest.with_name(dest.name + ".log")
    before = manifest_stamp(dest)
    proc = start_convert(src, dest, fmt, append, log)
    try:
        t0 = wait_started(proc, log)
        while manifest_stamp(dest) == before and proc.poll() is None:
            time.sleep(0.005)
        window = time.monotonic() - t0
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"baseline conversion failed: {log.read_text()[-500:]}")
        return window
    finally:
        kill_group(proc)


def phase(dest: Path, before: set[str], append: bool) -> str:
    """Where the kill landed, from what it left in DEST."""
    if (dest / "manifest.json").exists() and read_manifest(str(dest)).version == 1 + append:
        return "after the manifest"
    done = {p.name for p in (dest / "_index").glob("*.json")} - before
    return f"after {len(done)} new shards" if done else "before the first new shard"


def kill_and_rerun(src: Path, dest: Path, fmt: str, append: bool, window: float, expected: Expected,
                   rng: random.Random) -> tuple[float, str, list[str]]:
    """kill -9 `shardtrain convert` at a uniform moment of the window, rerun the same command;
    (delay, phase, problems)."""
    before = {p.name for p in (dest / "_index").glob("*.json")} if append else set()
    delay = rng.uniform(0, window)
    log = dest.with_name(dest.name + ".log")
    proc = start_convert(src, dest, fmt, append, log)
    try:
        t0 = wait_started(proc, log)
        while proc.poll() is None and time.monotonic() < t0 + delay:
            time.sleep(0.005)
    finally:
        finished = proc.poll() is not None
        kill_group(proc)
    where = "after it exited" if finished else phase(dest, before, append)
    try:
        convert(ConvertOptions(src=str(src), dest=str(dest), format=fmt, shard_size=SHARD_SIZE, workers=WORKERS,
                               append=append), progress=False)
    except Exception as e:  # the rerun must succeed; anything else is the trial's failure, reported
        return delay, where, [f"rerun failed: {type(e).__name__}: {e}"]
    return delay, where, store_problems(dest, expected)


def kill_sources(work: Path) -> tuple[Path, Path, Expected]:
    """`old`: the first day's images; `full`: old plus a second day's (what an --append adds)."""
    # Large enough that a conversion spends most of its time writing shards (~2-3 s), where kills matter.
    old = samples.make_imagefolder(work / "old", per_class={"train": 80, "val": 8}, size=40)
    (old / "train" / "chelsea" / "zero.jpg").write_bytes(b"")  # a reject, so resume keeps rejects.jsonl right too
    full = work / "full"
    shutil.copytree(old, full)
    samples.make_imagefolder(full, per_class={"train": 60}, size=40, seed=1, start=100)
    good = (full / "train" / "rocket" / "rocket_0100.jpg").read_bytes()
    (full / "train" / "rocket" / "cut.jpg").write_bytes(good[: len(good) // 2])
    return old, full, expected_store(full, {"train/chelsea/zero.jpg": "empty", "train/rocket/cut.jpg": "truncated"})


def conversion_kills(work: Path, kills: int, rng: random.Random) -> dict:
    work.mkdir(parents=True)
    old, full, expected = kill_sources(work)
    bases, windows, append_windows = {}, {}, {}
    for fmt in FORMATS:
        windows[fmt] = timed_convert(full, work / f"baseline-{fmt}", fmt, append=False)
        bases[fmt] = work / f"base-{fmt}"
        convert(ConvertOptions(src=str(old), dest=str(bases[fmt]), format=fmt, shard_size=SHARD_SIZE,
                               workers=WORKERS), progress=False)
        append_base = work / f"baseline-append-{fmt}"
        shutil.copytree(bases[fmt], append_base)
        append_windows[fmt] = timed_convert(full, append_base, fmt, append=True)
    print(f"baseline conversion {', '.join(f'{f} {windows[f]:.1f}s' for f in FORMATS)}; append "
          f"{', '.join(f'{f} {append_windows[f]:.1f}s' for f in FORMATS)} "
          "(kill window: from the layout line to manifest.json)",
          flush=True)

    ok = {False: 0, True: 0}
    for append in (False, True):
        for i in range(kills):
            fmt = FORMATS[i % 2]
            dest = work / f"{'append' if append else 'convert'}-{i}-{fmt}"
            if append:
                shutil.copytree(bases[fmt], dest)
            window = (append_windows if append else windows)[fmt]
            delay, where, problems = kill_and_rerun(full, dest, fmt, append, window, expected, rng)
            ok[append] += not problems
            what = "append" if append else "convert"
            verdict = "ok" if not problems else f"FAILED: {'; '.join(problems[:3])}"
            print(f"{what} kill {i + 1}/{kills} ({fmt}) at {delay:.2f}s ({where}): rerun {verdict}", flush=True)
            shutil.rmtree(dest)
    return {"convert_kills": 2 * kills, "convert_kills_ok": ok[False] + ok[True],
            "append_kills": kills, "append_kills_ok": ok[True]}


# ---- 2. bad inputs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """One input's expected outcome: rejected with one of `reasons`, or (reasons empty) converted, with
    its stored pixels within `tol` (mean absolute difference, 0..255) of `pixels` or, for boxes, these."""

    reasons: frozenset[str] = frozenset()
    pixels: np.ndarray | None = None
    tol: float = 0.0
    boxes: tuple | None = None  # yolo: (boxes, labels)


def reject(*reasons: str) -> Expect:
    return Expect(frozenset(reasons))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def on_white(rgba: Image.Image) -> np.ndarray:
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba.convert("RGBA")).convert("RGB"))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int) -> bytes:
    """A valid PNG header declaring side x side RGB pixels, with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def jpeg_bomb(jpeg: bytes, side: int) -> bytes:
    """A JPEG whose SOF0 frame header claims side x side pixels."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", side, side) + jpeg[sof + 9:]


def truncations(data: bytes, header_end: int, rng: random.Random, n: int) -> list[tuple[int, Expect]]:
    """n cuts, a few inside the header (where `not_an_image` is also a right reason), the rest in the data;
    never in the last tenth, where a decoder may legitimately have every pixel already."""
    cuts = sorted({rng.randrange(1, header_end) for _ in range(2)} | {rng.randrange(header_end, len(data) * 9 // 10)
                                                                         for _ in range(n - 2)})
    return [(c, reject("truncated", "not_an_image") if c < header_end else reject("truncated")) for c in cuts]


def image_corpus(root: Path, rng: random.Random, locked: bool) -> dict[str, Expect]:
    """Write the malformed image corpus as SRC/train/<bad|names|odd>/...; relpath -> expected outcome."""
    photos = [Image.open(p).convert("RGB") for p in samples.photo_paths()]

    def crop(w: int = 32, h: int = 32) -> Image.Image:
        img = rng.choice(photos)
        x, y = rng.randrange(img.width - 200), rng.randrange(img.height - 200)
        return img.crop((x, y, x + 200, y + 200)).resize((w, h))

    corpus: dict[str, tuple[bytes, Expect]] = {}
    jpg, png = encode(crop(), "JPEG", quality=90), encode(crop(), "PNG")
    for cut, expect in truncations(jpg, jpg.index(b"\xff\xda") + 2, rng, 8):
        corpus[f"bad/cut_{cut}.jpg"] = (jpg[:cut], expect)
    for cut, expect in truncations(png, png.index(b"IDAT") + 4, rng, 6):
        corpus[f"bad/cut_{cut}.png"] = (png[:cut], expect)
    for ext in ("jpg", "png", "webp"):
        for i in range(2):
            corpus[f"bad/random_{i}.{ext}"] = (rng.randbytes(rng.randrange(100, 5000)), reject("not_an_image"))
        corpus[f"bad/zero.{ext}"] = (b"", reject("empty"))
    corpus["bad/magic_garbage.jpg"] = (b"\xff\xd8\xff\xe0" + rng.randbytes(2000), reject("truncated", "not_an_image"))
    corpus["bad/magic_garbage.png"] = (png[:8] + rng.randbytes(2000), reject("truncated", "not_an_image"))
    corpus["bad/bomb_declared.png"] = (png_bomb(100_000), reject("too_large"))
    corpus["bad/bomb_declared.jpg"] = (jpeg_bomb(jpg, 65_000), reject("too_large"))
    corpus["bad/bomb_real.png"] = (encode(Image.new("1", (10_000, 10_000)), "PNG"), reject("too_large"))

    def odd(name: str, data: bytes, pixels: np.ndarray, tol: float) -> None:
        corpus[f"odd/{name}"] = (data, Expect(pixels=pixels, tol=tol))

    base = crop()
    rgb = np.asarray(base)
    gray = base.convert("L")
    odd("cmyk.jpg", encode(base.convert("CMYK"), "JPEG", quality=95), rgb, 8)
    odd("cmyk.tif", encode(base.convert("CMYK"), "TIFF"), rgb, 0)
    odd("gray16.png", encode(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG"),
        np.asarray(gray.convert("RGB")), 0)
    odd("gray.jpg", encode(gray, "JPEG", quality=95), np.asarray(gray.convert("RGB")), 3)
    la = Image.merge("LA", (gray, Image.linear_gradient("L").resize(gray.size)))
    odd("la.png", encode(la, "PNG"), on_white(la), 1)
    palette = base.quantize(32)
    odd("palette.png", encode(palette, "PNG"), np.asarray(palette.convert("RGB")), 0)
    alpha = np.where(np.asarray(palette) == 0, 0, 255).astype(np.uint8)
    odd("palette_transparent.png", encode(palette, "PNG", transparency=0),
        on_white(Image.fromarray(np.dstack([np.asarray(palette.convert("RGB")), alpha]))), 1)
    bits = base.convert("1")
    odd("onebit.png", encode(bits, "PNG"), np.asarray(bits.convert("RGB")), 0)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").rotate(90).resize(base.size))
    odd("rgba.png", encode(rgba, "PNG"), on_white(rgba), 1)
    odd("rgba_lossless.webp", encode(rgba, "WEBP", lossless=True, exact=True), on_white(rgba), 1)
    odd("rgb.webp", encode(base, "WEBP", quality=95), rgb, 8)
    odd("rgb.bmp", encode(base, "BMP"), rgb, 0)
    odd("palette.gif", encode(palette, "GIF"), np.asarray(palette.convert("RGB")), 0)
    odd("progressive.jpg", encode(base, "JPEG", quality=95, progressive=True), rgb, 8)
    odd("one_pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG"), np.array([[[200, 10, 30]]]), 0)
    tall = crop(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    odd("exif_rotated.jpg", encode(tall, "JPEG", quality=95, exif=exif.tobytes()),
        np.asarray(tall.transpose(Image.Transpose.ROTATE_270)), 8)

    names = ["with space.jpg", "ünïcödé 猫.jpg", "new\nline.jpg", "-leading-dash.jpg", "x" * 200 + ".jpg",
             "tab\tname.jpg", "quote'\"name.jpg", "UPPER.JPG", "back\\slash.jpg", "percent%20.jpg",
             "dots.in.name.jpg", "emoji 📷.jpg", unicodedata.normalize("NFC", "café.jpg"),
             unicodedata.normalize("NFD", "café.jpg")]
    for name in names:
        img = crop()
        corpus[f"names/{name}"] = (encode(img, "JPEG", quality=90), Expect(pixels=np.asarray(img), tol=8))
    first = corpus["names/with space.jpg"][0]
    corpus["odd/zz_duplicate.jpg"] = (first, reject("duplicate"))

    expected = {}
    for rel, (data, expect) in corpus.items():
        path = root / "train" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[f"train/{rel}"] = expect
    links = root / "train" / "bad"
    (links / "broken_link.jpg").symlink_to(root / "nowhere.jpg")
    expected["train/bad/broken_link.jpg"] = reject("unreadable")
    (links / "loop_a.jpg").symlink_to(links / "loop_b.jpg")
    (links / "loop_b.jpg").symlink_to(links / "loop_a.jpg")
    expected["train/bad/loop_a.jpg"] = expected["train/bad/loop_b.jpg"] = reject("unreadable")
    outside = root.parent / "outside.jpg"
    img = crop()
    outside.write_bytes(encode(img, "JPEG", quality=90))
    (root / "train" / "odd" / "link_to_outside.jpg").symlink_to(outside)
    expected["train/odd/link_to_outside.jpg"] = Expect(pixels=np.asarray(img), tol=8)
    if locked:
        path = links / "locked.jpg"
        path.write_bytes(encode(crop(), "JPEG", quality=90))
        path.chmod(0)
        expected["train/bad/locked.jpg"] = reject("unreadable")
    return expected


def latin1_corpus(root: Path) -> dict[str, Expect]:
    """One image whose file name is not UTF-8 (Linux allows any bytes but "/" and NUL), in a source of its
    own so that a crash on it does not hide the rest of the corpus."""
    samples.make_imagefolder(root, per_class={"train": 1}, size=32, classes=["chelsea"])
    made = root / "train" / "chelsea" / "chelsea_0000.jpg"
    raw = os.fsencode(made.parent) + b"/latin1_\xe9t\xe9.jpg"
    os.rename(made, raw)
    with Image.open(raw) as img:
        pixels = np.asarray(img.convert("RGB"))
    return {os.fsdecode(raw)[len(str(root)) + 1:]: Expect(pixels=pixels, tol=0)}


def yolo_corpus(root: Path) -> dict[str, Expect]:
    """make_yolo's images with hand-written label files; relpath -> expected outcome."""
    good = "0 0.5 0.5 0.2 0.2"
    labels = {
        "four_fields": ("0 0.5 0.5 0.2\n", reject("bad_label")),
        "six_fields": ("0 0.5 0.5 0.2 0.2 0.9\n", reject("bad_label")),
        "not_numbers": ("0 0.5 half 0.2 0.2\n", reject("bad_label")),
        "nan": ("0 nan 0.5 0.2 0.2\n", reject("bad_label")),
        "inf": ("0 0.5 0.5 inf 0.2\n", reject("bad_label")),
        "outside": ("1 1.5 0.5 0.2 0.2\n", reject("bad_label")),
        "negative_coord": ("1 0.5 -0.1 0.2 0.2\n", reject("bad_label")),
        "zero_width": ("1 0.5 0.5 0 0.2\n", reject("bad_label")),
        "negative_height": ("1 0.5 0.5 0.2 -0.2\n", reject("bad_label")),
        "float_class": ("1.5 0.5 0.5 0.2 0.2\n", reject("bad_label")),
        "negative_class": ("-1 0.5 0.5 0.2 0.2\n", reject("unknown_class", "bad_label")),
        "unknown_class": ("99 0.5 0.5 0.2 0.2\n", reject("unknown_class")),
        "good_then_bad": (f"{good}\n0 0.5\n", reject("bad_label")),
        "empty": ("", Expect(boxes=((), ()))),
        "blank_lines_crlf": (f"\r\n{good}\r\n  \r\n2 0.25 0.75 0.1 0.3  \r\n",
                             Expect(boxes=(((0.5, 0.5, 0.2, 0.2), (0.25, 0.75, 0.1, 0.3)), (0, 2)))),
        "scientific": ("3 5e-1 2.5E-1 1e-1 0.1\n", Expect(boxes=(((0.5, 0.25, 0.1, 0.1),), (3,)))),
        "missing": (None, Expect(boxes=((), ()))),
    }
    samples.make_yolo(root, per_split={"train": len(labels)}, size=48)
    expected = {}
    for i, (name, (text, expect)) in enumerate(labels.items()):
        image = root / "images" / "train" / f"{name}.jpg"
        (root / "images" / "train" / f"img_{i:04d}.jpg").rename(image)
        (root / "labels" / "train" / f"img_{i:04d}.txt").unlink()
        if text is not None:
            (root / "labels" / "train" / f"{name}.txt").write_text(text, newline="")
        expected[f"images/train/{name}.jpg"] = expect
    return expected


def outcome(rel: str, expect: Expect, stored: dict[str, list[Stored]], rejects: dict[str, list[dict]],
            cls: int | None) -> tuple[str, str]:
    """(converted | rejected | wrong, why) for one input of a finished conversion."""
    found, rejected = stored.get(sample_key(rel), []), rejects.get(rel, [])
    if expect.reasons:
        if len(rejected) == 1 and not found and rejected[0]["reason"] in expect.reasons:
            return "rejected", ""
        got = [r["reason"] for r in rejected] + ["stored"] * len(found)
        return "wrong", f"expected {'|'.join(sorted(expect.reasons))}, got {got or 'nothing'}"
    if len(found) != 1 or rejected:
        return "wrong", f"expected converted, got {len(found)} samples and rejects {[r['reason'] for r in rejected]}"
    sample = found[0]
    if expect.boxes is not None:
        boxes, labels = expect.boxes
        got_boxes = (sample.meta.get("boxes"), sample.meta.get("labels"))
        if got_boxes[1] != list(labels) or not np.allclose(np.asarray(got_boxes[0], float).reshape(-1, 4),
                                                             np.asarray(boxes, float).reshape(-1, 4), atol=1e-6):
            return "wrong", f"boxes {got_boxes} != expected {expect.boxes}"
        return "converted", ""
    if sample.meta.get("cls") != cls:
        return "wrong", f"class {sample.meta.get('cls')} != {cls}"
    with Image.open(io.BytesIO(sample.image)) as img:
        if img.mode not in ("RGB", "L"):
            return "wrong", f"stored mode {img.mode}"
        pixels = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=float)
    expected = expect.pixels
    assert expected is not None, f"{rel}: an Expect that is neither rejected nor boxes gives pixels"
    if pixels.shape != expected.shape:
        want = expected.shape
        return "wrong", f"stored {pixels.shape[1]}x{pixels.shape[0]}, expected {want[1]}x{want[0]}"
    diff = float(np.abs(pixels - expected).mean())
    if diff > expect.tol:
        return "wrong", f"pixels differ by {diff:.1f} (> {expect.tol})"
    return "converted", ""


def cli_convert_corpus(src: Path, dest: Path, fmt: str, layout: str, as_user: list[str]) -> tuple[int, str]:
    cmd = [*as_user, SHARDTRAIN, "convert", str(src), str(dest), "--format", fmt, "--layout", layout,
           "--shard-size", "16samples", "--workers", str(WORKERS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", start_new_session=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def classify_conversion(src: Path, dest: Path, fmt: str, layout: str, expected: dict[str, Expect],
                        as_user: list[str]) -> Counter:
    code, out = cli_convert_corpus(src, dest, fmt, layout, as_user)
    counts: Counter = Counter()
    if code != 0 or "Traceback" in out:
        last = out.strip().splitlines()[-1] if out.strip() else ""
        print(f"  {layout} {fmt}: CRASHED (exit {code}): {last[:200]}", flush=True)
        counts["crashed"] = len(expected)
        return counts
    stored: dict[str, list[Stored]] = {}
    for s in read_samples(dest):
        stored.setdefault(s.key, []).append(s)
    rejects: dict[str, list[dict]] = {}
    for r in read_rejects(dest):
        rejects.setdefault(r["path"], []).append(r)
    classes = read_manifest(str(dest)).classes
    keys = {sample_key(rel) for rel in expected}
    for key in stored.keys() - keys:
        counts["wrong"] += 1
        print(f"  {layout} {fmt}: stored {key!r}, which is no input of the corpus", flush=True)
    for rel, expect in expected.items():
        cls = classes.index(rel.split("/")[1]) if layout == "imagefolder" else None
        result, why = outcome(rel, expect, stored, rejects, cls)
        counts[result] += 1
        if result == "wrong":
            print(f"  {layout} {fmt}: WRONG {rel!r}: {why}", flush=True)
    print(f"  {layout} {fmt}: {counts['converted']} converted, {counts['rejected']} rejected, "
          f"{counts['wrong']} wrong (exit {code})", flush=True)
    return counts


def bad_inputs(work: Path, rng: random.Random) -> dict:
    work.mkdir(parents=True)
    as_user = NO_DAC if os.geteuid() == 0 and shutil.which("setpriv") else []
    locked = os.geteuid() != 0 or bool(as_user)  # else root reads a chmod 0 file: leave that input out
    images = image_corpus(work / "images", rng, locked)
    latin1 = latin1_corpus(work / "latin1")
    labels = yolo_corpus(work / "yolo")
    print(f"bad-input corpus: {len(images) + len(latin1)} image inputs, {len(labels)} yolo label inputs"
          f"{'' if locked else ' (no unreadable file: running as root without setpriv)'}", flush=True)
    counts: Counter = Counter()
    for fmt in FORMATS:
        counts += classify_conversion(work / "images", work / f"store-{fmt}", fmt, "imagefolder", images, as_user)
        counts += classify_conversion(work / "latin1", work / f"latin1-{fmt}", fmt, "imagefolder", latin1, [])
    counts += classify_conversion(work / "yolo", work / "store-yolo", "wds", "yolo", labels, [])
    return {"bad_inputs": sum(counts.values()), "bad_inputs_distinct": len(images) + len(latin1) + len(labels),
            "bad_inputs_converted": counts["converted"], "bad_inputs_rejected": counts["rejected"],
            "bad_inputs_wrong": counts["wrong"], "bad_inputs_crashed": counts["crashed"]}


# ---- 3. corrupt stores -------------------------------------------------------------------------------------------


def good_stores(work: Path) -> dict[str, Path]:
    src = samples.make_imagefolder(work / "src", per_class={"train": 8, "val": 2}, size=32)
    stores = {}
    for fmt in FORMATS:
        stores[fmt] = work / f"good-{fmt}"
        convert(ConvertOptions(src=str(src), dest=str(stores[fmt]), format=fmt, shard_size=SHARD_SIZE, workers=1),
                progress=False)
    return stores


def corrupt(path: Path, rng: random.Random) -> str:
    """A random bit flip or truncation of the file; says which."""
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5:
        at, bit = rng.randrange(len(data)), rng.randrange(8)
        data[at] ^= 1 << bit
        path.write_bytes(bytes(data))
        return f"bit {bit} of byte {at} of {len(data)} flipped"
    at = rng.randrange(len(data))
    path.write_bytes(bytes(data[:at]))
    return f"truncated to {at} of {len(data)} bytes"


def cli_verify(dest: Path) -> tuple[int, str]:
    proc = subprocess.run([*SHARDS_CLI, "verify", str(dest), "--deep"], capture_output=True, text=True,
                          start_new_session=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def corrupt_stores(work: Path, kills: int, rng: random.Random) -> dict:
    work.mkdir(parents=True)
    stores = good_stores(work)
    figures: Counter[str] = Counter()
    for i in range(2 * kills):  # kills shards, then kills index files
        fmt = FORMATS[i % 2]
        dest = work / f"corrupt-{i}-{fmt}"
        shutil.copytree(stores[fmt], dest)
        manifest = read_manifest(str(dest))
        shard = rng.choice([s.name for split in manifest.splits.values() for s in split.shards])
        target = dest / shard if i < kills else dest / "_index" / f"{shard}.json"
        how = corrupt(target, rng)
        code, out = cli_verify(dest)
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        caught = code == 1 and any(line.startswith(f"error: {shard}") for line in errors) and "Traceback" not in out
        kind = "corruptions" if i < kills else "index_corruptions"
        figures[kind] += 1
        figures[f"{kind}_caught"] += caught
        figures["corruptions_crashed_verify"] += code < 0 or "Traceback" in out
        said = errors[0][7:] if errors else (out.strip().splitlines() or ["(nothing)"])[-1]
        print(f"corruption {i + 1}/{2 * kills}: {target.relative_to(dest)} ({fmt}), {how}: verify exit {code}, "
              f"{'caught' if caught else 'MISSED'}: {said[:150]}", flush=True)
        shutil.rmtree(dest)
    return {k: figures[k] for k in ("corruptions", "corruptions_caught", "index_corruptions",
                                    "index_corruptions_caught", "corruptions_crashed_verify")}


# ---- 3b. training on damaged samples -----------------------------------------------------------------------------


def damage_samples(dest: Path, count: int, rng: random.Random) -> list[str]:
    """Overwrite the start of `count` train images (their JPEG header) in place, leaving the shard's
    structure whole: a store whose sample bytes went bad. Returns the damaged shards' names."""
    manifest = read_manifest(str(dest))
    shards = rng.sample([s.name for s in manifest.splits["train"].shards], count)
    for name in shards:
        path = dest / name
        stored = tar_samples(path) if manifest.format == "wds" else lmdb_samples(path)
        image = rng.choice(stored).image
        data = bytearray(path.read_bytes())
        noise = rng.randbytes(32)
        # every copy: an LMDB file can keep stale copies of a value's pages, and the live one may not be first
        while (at := data.find(image)) >= 0:
            data[at:at + 32] = noise
        path.write_bytes(bytes(data))
    return shards


def train_config(path: Path, store: Path, on_error: str) -> Path:
    cfg = {
        "name": path.stem, "runs_dir": str(path.parent / "runs"), "seed": 0,
        "data": {"path": str(store), "image_size": 32, "batch_size": 8, "workers": 0, "pin_memory": False,
                 "channels_last": False, "on_error": on_error},
        "model": {"name": "test_resnet"},
        "train": {"epochs": 1, "log_every": 100},
        "checkpoint": {"every_steps": 1000},
        "resume": "never",
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path) -> tuple[int, str]:
    proc = subprocess.run([PYTHON, "-m", "training", str(config)], capture_output=True, text=True,
                          start_new_session=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def skipped_samples(work: Path, name: str) -> int:
    """The run's own count of corrupt samples it skipped, summed over ranks (metrics.json)."""
    return json.loads((work / "runs" / name / "metrics.json").read_text())["skipped_samples"]


def damaged_training(work: Path, rng: random.Random) -> dict:
    """Train one epoch on stores with damaged samples: `skip` must finish and say how many it skipped,
    `fail` must stop with one line naming the shard. Then an LMDB whose file was cut short."""
    work.mkdir(parents=True)
    stores = good_stores(work)
    figures: Counter[str] = Counter()
    for fmt in FORMATS:
        dest = work / f"damaged-{fmt}"
        shutil.copytree(stores[fmt], dest)
        damaged = damage_samples(dest, 2, rng)
        code, out = train(train_config(work / f"skip-{fmt}.yaml", dest, "skip"))
        skipped = skipped_samples(work, f"skip-{fmt}") if code == 0 else None
        figures["corrupt_train_skip_ok"] += skipped == 2
        figures["corrupt_train_skipped"] += skipped or 0
        print(f"train on {fmt} store with 2 damaged samples, on_error skip: exit {code}, "
              f"metrics.json skipped_samples {skipped}", flush=True)
        code, out = train(train_config(work / f"fail-{fmt}.yaml", dest, "fail"))
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        named = code != 0 and len(errors) == 1 and any(n in errors[0] for n in damaged) and "Traceback" not in out
        figures["corrupt_train_fail_names_shard"] += named
        print(f"train on {fmt} store with 2 damaged samples, on_error fail: exit {code}, "
              f"{errors[-1] if errors else out.strip().splitlines()[-1]}", flush=True)

    dest = work / "cut-lmdb"
    shutil.copytree(stores["lmdb"], dest)
    shard = dest / read_manifest(str(dest)).splits["train"].shards[0].name
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, out = train(train_config(work / "cut.yaml", dest, "skip"))
    last = out.strip().splitlines()[-1] if out.strip() else ""
    counted = f"skipped_samples {skipped_samples(work, 'cut')}, " if code == 0 else ""
    print(f"train on an lmdb store whose {shard.name} was cut in half, on_error skip: exit {code}"
          f"{' (killed by signal ' + str(-code) + ')' if code < 0 else ''}: {counted}{last[:150]}", flush=True)
    figures["corrupt_train_lmdb_cut_crashed"] = int(code < 0)
    return {k: figures[k] for k in ("corrupt_train_skip_ok", "corrupt_train_skipped", "corrupt_train_fail_names_shard",
                                    "corrupt_train_lmdb_cut_crashed")}
