"""Image bytes to an RGB uint8 array, the way every reader of the store must: EXIF applied."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
JPEG_SOI = b"\xff\xd8\xff"
# OpenCV's reduced-size colour reads are the plain colour flag plus a scale bit; ours asks for RGB instead of BGR.
REDUCED = {1: 0, 2: cv2.IMREAD_REDUCED_COLOR_2 & ~cv2.IMREAD_COLOR, 4: cv2.IMREAD_REDUCED_COLOR_4 & ~cv2.IMREAD_COLOR,
           8: cv2.IMREAD_REDUCED_COLOR_8 & ~cv2.IMREAD_COLOR}


def decode_image(data: bytes, min_side: int | None = None) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB with EXIF orientation applied.

    With `min_side`, a JPEG much larger than needed is decoded at a reduced scale by
    libjpeg (DCT scaling: 1/2, 1/4 or 1/8) while both sides stay >= `min_side`; the
    scale is a power of two, so this is cheap and never a visible loss at the target size.
    """
    if not data:  # else Pillow's "cannot identify" below would say it starts with nothing
        raise OSError("empty (0 bytes)")
    if data[:3] == JPEG_SOI:
        return decode_jpeg(data, min_side)
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names a BytesIO object's address, no help to anyone
        raise OSError(f"not an image (starts with {data[:8].hex()})") from None
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
        img = ImageOps.exif_transpose(img)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def decode_jpeg(data: bytes, min_side: int | None) -> np.ndarray:
    """OpenCV's libjpeg-turbo decode: the same pixels as Pillow's (same library, same IDCT) in about 0.4x
    of Pillow's time on the dev machine, with EXIF orientation applied by OpenCV itself."""
    scale = 1
    if min_side:
        width, height = Image.open(io.BytesIO(data)).size  # header only
        while scale < 8 and -(-min(width, height) // (scale * 2)) >= min_side:
            scale *= 2
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | REDUCED[scale])
    if image is None:  # OpenCV returns None for truncated or unreadable data, where Pillow raises
        raise OSError("JPEG data is truncated or corrupt")
    return image


def probe_image(data: bytes) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) from the header alone, without decoding pixels.

    Width and height are those of the stored pixels, before orientation is applied.
    """
    img = Image.open(io.BytesIO(data))
    return img.width, img.height, int(img.getexif().get(EXIF_ORIENTATION, 1))
