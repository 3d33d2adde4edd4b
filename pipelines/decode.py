"""Image bytes to an RGB uint8 array, the way every reader of the store must: EXIF applied."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112


def decode_image(data: bytes, min_side: int | None = None) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB with EXIF orientation applied.

    With `min_side`, a JPEG much larger than needed is decoded at a reduced scale by
    libjpeg (`Image.draft`: 1/2, 1/4 or 1/8) while both sides stay >= `min_side`; the
    scale is a power of two, so this is cheap and never a visible loss at the target size.
    """
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def probe_image(data: bytes) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) from the header alone, without decoding pixels.

    Width and height are those of the stored pixels, before orientation is applied.
    """
    img = Image.open(io.BytesIO(data))
    return img.width, img.height, int(img.getexif().get(EXIF_ORIENTATION, 1))
