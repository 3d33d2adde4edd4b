"""The per-input work done in the worker processes: read, hash, fully decode, keep or re-encode."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shards.layouts import Input
from shards.storage import is_local, join, special_file

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
LOSSLESS_FORMATS = {"PNG", "BMP", "GIF", "TIFF", "PPM", "TGA", "ICO"}  # re-encoded as PNG, others JPEG
# (and WebP when its bitstream is VP8L: see webp_is_lossless)
JPEG_QUALITY = 95
_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")  # in the message of Pillow's DecompressionBombError


@dataclass(frozen=True)
class Settings:
    """What a worker needs besides the input: where SRC is and the conversion limits."""

    fs: fsspec.AbstractFileSystem
    root: str
    max_side: int | None
    max_pixels: int
    num_classes: int


@dataclass
class Sample:
    input: Input
    sha1: str
    ext: str  # jpg | png | webp
    image: bytes
    meta: dict = field(default_factory=dict)  # {"cls": i} or {"boxes": [...], "labels": [...]}
    label_sha1: str | None = None  # yolo: label_digest of its label file

    @property
    def nbytes(self) -> int:
        return len(self.image)


@dataclass
class Reject:
    input: Input
    sha1: str | None
    reason: str
    detail: str
    of: str | None = None  # for duplicates: the key of the first input with this content
    label_sha1: str | None = None  # for `changed`: the label_digest found


@dataclass
class Digest:
    """An input already in the store: only its content hashes are needed (for `changed`)."""

    input: Input
    sha1: str
    label_sha1: str | None = None  # yolo: label_digest of its label file


Result = Sample | Reject | Digest


class BadInput(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def process(settings: Settings, task: tuple[Input, bool]) -> Result:
    """Turn one input into a Sample or a Reject; with `digest_only`, just hash it."""
    item, digest_only = task
    sha1 = None
    try:
        data = read_source(settings.fs, join(settings.root, item.relpath))
        sha1 = hashlib.sha1(data).hexdigest()
        if digest_only:
            return Digest(item, sha1, label_digest(read_label(settings, item)))
        with pillow_pixel_limit(settings.max_pixels):
            ext, image = encode_for_store(data, settings.max_side, settings.max_pixels)
        label = read_label(settings, item)
        meta = label_meta(item, label, settings.num_classes)
    except BadInput as e:
        return Reject(item, sha1, e.reason, e.detail)
    return Sample(item, sha1, ext, image, meta, label_digest(label))


def read_source(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The file's bytes; a file that cannot be read is a reject, but a remote store's other
    errors (network, throttling) propagate: the run stops, and rerunning it resumes."""
    try:
        data = cat_regular(fs, path)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise BadInput("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    except OSError as e:
        if not is_local(fs):
            raise
        raise BadInput("unreadable", f"{type(e).__name__}: {e}") from None
    if not data:
        raise BadInput("empty", "file has 0 bytes")
    return data


def cat_regular(fs: fsspec.AbstractFileSystem, path: str, prefix: str = "") -> bytes:
    """fs.cat_file of a regular file; any other kind is a `not_a_file` reject, never opened (storage.special_file)."""
    kind = special_file(fs, path)
    if kind:
        raise BadInput("not_a_file", f"{prefix}{kind}, not a regular file")
    return fs.cat_file(path)


def encode_for_store(data: bytes, max_side: int | None, max_pixels: int) -> tuple[str, bytes]:
    """(extension, bytes) to store: the original bytes when they are fine, else a re-encode.

    The image is always fully decoded here, so a corrupt file never reaches training.
    """
    img = open_image(data, max_pixels)
    eight_bit = not any("16" in str(t.args) for t in img.tile)  # tile args are cleared by load()
    fits = max_side is None or max(img.size) <= max_side
    if max_side is not None and not fits and img.format == "JPEG":
        # DCT scaling: decode at 1/2..1/8 size, never below max_side; every byte is still read
        img.draft(img.mode, (max_side, max_side))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked in open_image
            img.load()
    except Image.DecompressionBombError as e:
        raise too_large(e, max_pixels) from None
    except Exception as e:  # plugins raise all sorts on corrupt data (struct.error, IndexError...)
        raise BadInput("truncated", str(e) or type(e).__name__) from None
    if img.format in KEPT_FORMATS and img.mode in ("RGB", "L") and eight_bit and fits \
            and "transparency" not in img.info:
        return KEPT_FORMATS[img.format], data
    lossless = img.format in LOSSLESS_FORMATS or (img.format == "WEBP" and webp_is_lossless(data))
    rgb = to_rgb(ImageOps.exif_transpose(img))  # the orientation tag is not carried into a re-encode
    if max_side is not None and not fits:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if lossless:
        rgb.save(out, "PNG")
        return "png", out.getvalue()
    rgb.save(out, "JPEG", quality=JPEG_QUALITY)
    return "jpg", out.getvalue()


def webp_is_lossless(data: bytes) -> bool:
    """Whether a WebP's (first) image is a VP8L bitstream, WebP's lossless coding; Pillow does not say.

    A simple file's first chunk is the bitstream; an extended one (VP8X: alpha, metadata, animation)
    lists chunks, with each animation frame (ANMF) holding its own after a 16-byte frame header.
    Lossy images with alpha are VP8X + ALPH + "VP8 ": lossy.
    """
    pos = 12  # past "RIFF", the file size and "WEBP"
    while pos + 8 <= len(data):
        fourcc, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if fourcc in (b"VP8L", b"VP8 "):
            return fourcc == b"VP8L"
        pos += 8 + 16 if fourcc == b"ANMF" else 8 + size + (size & 1)  # chunks are padded to even sizes
    return False


def open_image(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise too_large(e, max_pixels) from None
    except UnidentifiedImageError:
        raise BadInput("not_an_image", "cannot identify image file") from None
    except Exception as e:  # a recognised header whose body is broken (see encode_for_store)
        raise BadInput("truncated", str(e) or type(e).__name__) from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadInput("too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    return img


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS by itself (when opening, before open_image
    sees the size, and per GIF frame or TIFF tile when loading): raise that limit to --max-pixels for the
    decode, so that a --max-pixels above Pillow's is honoured. Never lowered: other threads may decode."""
    pillows = Image.MAX_IMAGE_PIXELS
    if pillows is not None:
        Image.MAX_IMAGE_PIXELS = max(pillows, max_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pillows


def too_large(e: Image.DecompressionBombError, max_pixels: int) -> BadInput:
    """Pillow's refusal, with our limit: its message quotes its own (twice Image.MAX_IMAGE_PIXELS)."""
    found = _PILLOW_PIXELS.search(str(e))
    return BadInput("too_large", f"{found.group(1) + ' pixels' if found else 'more pixels'} > max_pixels {max_pixels}")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited on white, 16-bit scaled (not clipped), CMYK/palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np  # here: only 16-bit images need it, and `shardtrain --help` should not wait for it

        wide = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.round(wide / 257).astype(np.uint8), "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def read_label(settings: Settings, item: Input) -> bytes | None:
    """A yolo input's label file, b"" when there is none (no objects, as in YOLO itself); None for other layouts."""
    if item.label_relpath is None:
        return None
    try:
        return cat_regular(settings.fs, join(settings.root, item.label_relpath), f"label {item.label_relpath}: ")
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise BadInput("unreadable", f"label {item.label_relpath}: {e}") from None


def label_digest(label: bytes | None) -> str | None:
    """What identifies a yolo input's label for `changed`: the SHA-1 of its label file (EMPTY_LABEL where there
    is none: a missing file and an empty one both mean no objects)."""
    return None if label is None else hashlib.sha1(label).hexdigest()


EMPTY_LABEL = hashlib.sha1(b"").hexdigest()


def label_meta(item: Input, label: bytes | None, num_classes: int) -> dict:
    """The non-image members of a sample: class index, YOLO boxes (`label`: read_label's), or nothing (unlabeled)."""
    if item.cls is not None:
        return {"cls": item.cls}
    if label is None:
        return {}
    try:
        text = label.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput("unreadable", f"label {item.label_relpath}: {e}") from None
    return parse_yolo_labels(text, num_classes)


def parse_yolo_labels(text: str, num_classes: int) -> dict:
    """`class cx cy w h` per line, normalised to [0, 1]; empty lines are skipped."""
    boxes, labels = [], []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise BadInput("bad_label", f"line {n}: {len(fields)} fields, expected 5 (class cx cy w h)")
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(f) for f in fields[1:])
        except ValueError:
            raise BadInput("bad_label", f"line {n}: not numbers: {line.strip()!r}") from None
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            raise BadInput("bad_label", f"line {n}: box outside [0, 1] or empty: {line.strip()!r}")
        if not 0 <= cls < num_classes:
            raise BadInput("unknown_class", f"line {n}: class {cls} not in data.yaml names (0..{num_classes - 1})")
        boxes.append([cx, cy, w, h])
        labels.append(cls)
    return {"boxes": boxes, "labels": labels}
