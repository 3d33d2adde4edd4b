"""Raw folders made from the bundled photos, for the demo, the tests and the benchmarks.

The photos (see LICENSE.md beside this file) are real; the folders are cut from them
with a seeded RNG, so the same seed always gives the same files:

- `make_imagefolder`: one class per photo (or per region of a photo), each image a random crop
  of it, written class by class into class folders as real sources are.
- `make_unlabeled`: random crops of all photos in a nested tree.
- `make_yolo`: crops of the photos ("objects", one class each) pasted onto the
  grayscale texture photos, with their YOLO boxes and a `data.yaml`.
- `make_coins`: a one-class YOLO set of real objects: windows of the coins photo, each coin
  boxed by a segmentation of the photo, train and held-out windows from disjoint rows of coins.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

PHOTOS_DIR = Path(__file__).parent / "photos"
TEXTURES = ("brick", "coins")


def photo_paths() -> list[Path]:
    return sorted(PHOTOS_DIR.glob("*.jpg"))


def _open(name: str) -> Image.Image:
    return Image.open(PHOTOS_DIR / f"{name}.jpg").convert("RGB")


def _random_crop(img: Image.Image, rng: random.Random, size: int) -> Image.Image:
    w, h = img.size
    side = rng.randint(min(w, h) // 3, min(w, h))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    return img.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)


def class_names() -> list[str]:
    return [p.stem for p in photo_paths() if p.stem not in TEXTURES]


def make_imagefolder(
    dest: str | Path,
    per_class: dict[str, int] | None = None,
    size: int = 64,
    seed: int = 0,
    classes: list[str] | None = None,
    start: int = 0,
    grid: int = 1,
    flat: bool = False,
) -> Path:
    """Write `dest/<split>/<class>/<class>_<i>.jpg`; `per_class` maps split to images per class.

    `grid` > 1 cuts each photo into grid x grid regions, each a class `<photo>_<row><col>` of crops
    inside it: many classes of real content (6 photos at grid 4: 96 classes). `flat` writes a
    source with no split folders, `dest/<class>/...`, from a `per_class` of one split. `start`
    offsets the file numbers, so a second call with a larger `start` adds new files beside the
    old ones (as a day of new images would).
    """
    dest = Path(dest)
    per_class = per_class or {"train": 16, "val": 4}
    if flat and len(per_class) != 1:
        raise ValueError("a flat source has one split: per_class={'train': N}")
    rng = random.Random(seed)
    for name in classes or class_names():
        photo = _open(name)
        for region, part in regions(photo, grid):
            label = name if grid == 1 else f"{name}_{region}"
            for split, count in per_class.items():
                folder = dest / label if flat else dest / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(start, start + count):
                    _random_crop(part, rng, size).save(folder / f"{label}_{i:04d}.jpg", quality=90)
    return dest


def regions(photo: Image.Image, grid: int) -> list[tuple[str, Image.Image]]:
    """The photo cut into grid x grid parts, named "<row><col>" (the whole photo for grid 1)."""
    w, h = photo.size
    return [(f"{r}{c}", photo.crop((c * w // grid, r * h // grid, (c + 1) * w // grid, (r + 1) * h // grid)))
            for r in range(grid) for c in range(grid)]


def make_unlabeled(dest: str | Path, count: int = 32, size: int = 64, seed: int = 0) -> Path:
    """Write `count` crops into a nested tree `dest/<photo>/<a|b>/crop_<i>.jpg`."""
    dest = Path(dest)
    rng = random.Random(seed)
    photos = {p.stem: Image.open(p).convert("RGB") for p in photo_paths()}
    names = sorted(photos)
    for i in range(count):
        name = names[i % len(names)]
        folder = dest / name / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        _random_crop(photos[name], rng, size).save(folder / f"crop_{i:04d}.jpg", quality=90)
    return dest


def make_yolo(
    dest: str | Path,
    per_split: dict[str, int] | None = None,
    size: int = 128,
    seed: int = 0,
    max_objects: int = 3,
) -> Path:
    """Write a YOLO set: `images/<split>/*.jpg`, `labels/<split>/*.txt`, `data.yaml`."""
    dest = Path(dest)
    per_split = per_split or {"train": 16, "val": 4}
    rng = random.Random(seed)
    names = class_names()
    objects = [_open(n) for n in names]
    textures = [_open(t) for t in TEXTURES]
    for split, count in per_split.items():
        (dest / "images" / split).mkdir(parents=True, exist_ok=True)
        (dest / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            canvas = _random_crop(rng.choice(textures), rng, size)
            lines: list[str] = []
            placed: list[tuple[int, int, int, int]] = []
            for _ in range(rng.randint(1, max_objects)):
                cls = rng.randrange(len(names))
                w, h = rng.randint(size // 5, size // 2), rng.randint(size // 5, size // 2)
                x, y = rng.randint(0, size - w), rng.randint(0, size - h)
                if any(x < px + pw and px < x + w and y < py + ph and py < y + h for px, py, pw, ph in placed):
                    continue  # objects never overlap, so every box is fully visible
                placed.append((x, y, w, h))
                canvas.paste(objects[cls].resize((w, h), Image.Resampling.BILINEAR), (x, y))
                lines.append(f"{cls} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            canvas.save(dest / "images" / split / f"img_{i:04d}.jpg", quality=90)
            (dest / "labels" / split / f"img_{i:04d}.txt").write_text("\n".join(lines) + "\n")
    names_yaml = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
    (dest / "data.yaml").write_text(
        f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names_yaml}\n"
    )
    return dest


# The coins photo holds 24 coins in 4 rows; the first three rows (above y=225) make the train windows and the
# fourth the held-out ones, so no held-out coin is ever seen in training.
COINS_HELD_OUT_Y = 225


def coin_boxes() -> np.ndarray:
    """(x0, y0, x1, y1) pixel boxes of the 24 coins of coins.jpg, from a segmentation of the photo: local
    (adaptive) threshold against the uneven lighting, holes filled, connected components of over 500 px."""
    gray = cv2.imread(str(PHOTOS_DIR / "coins.jpg"), cv2.IMREAD_GRAYSCALE)
    if gray is None:  # imread returns None rather than raising
        raise FileNotFoundError(f"cannot read {PHOTOS_DIR / 'coins.jpg'}")
    fg = cv2.adaptiveThreshold(cv2.GaussianBlur(gray, (5, 5), 0), 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C,
                               cv2.THRESH_BINARY, 71, -5)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    outside = fg.copy()
    cv2.floodFill(outside, None, (0, 0), 255)  # the background reached from a corner; the rest is coins
    _, _, stats, _ = cv2.connectedComponentsWithStats(fg | ~outside)
    x, y, w, h, area = stats[1:].T
    keep = area > 500
    return np.stack([x, y, x + w, y + h], axis=1)[keep].astype(np.float32)


def _free_cuts(lo: int, hi: int, spans: np.ndarray) -> list[int]:
    """Positions in [lo, hi] where a straight cut passes through none of the (start, end) spans."""
    return [c for c in range(lo, hi + 1) if not ((spans[:, 0] < c) & (c < spans[:, 1])).any()]


def _coin_window(rng: random.Random, boxes: np.ndarray, region: tuple[int, int, int, int],
                 coins: tuple[int, int]) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A random window of `region` whose edges cut no coin, holding between coins[0] and coins[1] of them
    (at most all of the region's); and its coins."""
    x0r, y0r, x1r, y1r = region
    inside = boxes[(boxes[:, 1] >= y0r) & (boxes[:, 3] <= y1r)]
    lo, hi = min(coins[0], len(inside)), coins[1]
    rows = _free_cuts(y0r, y1r, inside[:, [1, 3]])
    while True:
        top, bottom = sorted(rng.sample(rows, 2))
        band = inside[(inside[:, 1] < bottom) & (inside[:, 3] > top)]
        cols = _free_cuts(x0r, x1r, band[:, [0, 2]])
        left, right = sorted(rng.sample(cols, 2))
        held = band[(band[:, 0] >= left) & (band[:, 2] <= right)]
        if lo <= len(held) <= hi:
            return (left, top, right, bottom), held


def coin_scale(window: tuple[int, int, int, int], held: np.ndarray) -> float:
    """The coins' mean side over the window's longest side: their size once the image is letterboxed to 1."""
    left, top, right, bottom = window
    return float(np.maximum(held[:, 2] - held[:, 0], held[:, 3] - held[:, 1]).mean()) / max(right - left, bottom - top)


def _zoomed_window(rng: random.Random, boxes: np.ndarray, region: tuple[int, int, int, int],
                   coins: tuple[int, int], zoom: float) -> tuple[tuple[int, int, int, int], np.ndarray, float]:
    """A window whose coins, once letterboxed, are `zoom` times the size of those of a window of coins[0] to
    coins[1] coins (drawn as a reference); and its coins, and the margin (>= 1) to frame it with to get there.
    Zooming in needs a window of fewer coins (1 to coins[1]), zooming out the margin."""
    for _ in range(10_000):
        target = zoom * coin_scale(*_coin_window(rng, boxes, region, coins))
        window, held = _coin_window(rng, boxes, region, coins if zoom <= 1 else (1, coins[1]))
        if coin_scale(window, held) >= target:
            return window, held, coin_scale(window, held) / target
    raise ValueError(f"zoom {zoom:.2f}: no window of the coins photo shows its coins that large")


def _frame(rng: random.Random, window: Image.Image, margin: float) -> tuple[Image.Image, tuple[int, int]]:
    """The window placed at random in a frame `margin` times its size, of its own edges' median grey; and where.
    A margin of 1 draws nothing from `rng` (the unzoomed splits are the sets they were before zoom existed)."""
    if margin == 1.0:
        return window, (0, 0)
    w, h = round(window.width * margin), round(window.height * margin)
    x, y = rng.randint(0, w - window.width), rng.randint(0, h - window.height)
    pixels = np.asarray(window)
    grey = int(np.median(np.concatenate([pixels[[0, -1]].ravel(), pixels[:, [0, -1]].ravel()])))
    framed = Image.new(window.mode, (w, h), (grey,) * len(window.getbands()))
    framed.paste(window, (x, y))
    return framed, (x, y)


def make_coins(
    dest: str | Path,
    per_split: dict[str, int] | None = None,
    scale: dict[str, tuple[float, float]] | None = None,
    coins: dict[str, tuple[int, int]] | None = None,
    seed: int = 0,
    zoom: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """Write a one-class ("coin") YOLO set of windows of the coins photo: `images/<split>/*.jpg`,
    `labels/<split>/*.txt`, `data.yaml`.

    Each image is a random window of the photo whose edges pass through no coin (every coin in it is whole,
    so every box is the coin's), holding coins[split] = (fewest, most) coins (default (2, 24)), resized by a
    random factor in scale[split] (default (1, 2): coins of about 40 to 130 px). The "train" split is cut from
    the top three rows of coins (18 coins), every other split from the held-out fourth row (6 coins). Fewer
    coins in a window means larger coins once the image is letterboxed to a training size.

    A split in `zoom` shows its coins at another scale: each image's coins, once letterboxed, are a factor
    drawn from zoom[split] times the size of those of a window of coins[split] coins (`coin_scale`), as if
    photographed from nearer or farther. Zooming out frames the window in a margin of its own background grey.
    """
    dest = Path(dest)
    per_split = per_split or {"train": 64, "val": 16}
    scale, coins, zoom = scale or {}, coins or {}, zoom or {}
    rng = random.Random(seed)
    photo = _open("coins")
    boxes = coin_boxes()
    for split, count in per_split.items():
        (dest / "images" / split).mkdir(parents=True, exist_ok=True)
        (dest / "labels" / split).mkdir(parents=True, exist_ok=True)
        region = (0, 0, photo.width, COINS_HELD_OUT_Y) if split == "train" else \
            (0, COINS_HELD_OUT_Y, photo.width, photo.height)
        lo, hi = scale.get(split, (1.0, 2.0))
        for i in range(count):
            split_coins = coins.get(split, (2, 24))
            if split in zoom:
                (left, top, right, bottom), held, margin = _zoomed_window(rng, boxes, region, split_coins,
                                                                          rng.uniform(*zoom[split]))
            else:
                ((left, top, right, bottom), held), margin = _coin_window(rng, boxes, region, split_coins), 1.0
            image, (x, y) = _frame(rng, photo.crop((left, top, right, bottom)), margin)
            w, h = image.size
            f = rng.uniform(lo, hi)
            image.resize((round(w * f), round(h * f)), Image.Resampling.BILINEAR).save(
                dest / "images" / split / f"coins_{i:04d}.jpg", quality=90)
            cx, cy = ((held[:, 0] + held[:, 2]) / 2 - left + x) / w, ((held[:, 1] + held[:, 3]) / 2 - top + y) / h
            bw, bh = (held[:, 2] - held[:, 0]) / w, (held[:, 3] - held[:, 1]) / h
            (dest / "labels" / split / f"coins_{i:04d}.txt").write_text(
                "".join(f"0 {a:.6f} {b:.6f} {c:.6f} {d:.6f}\n" for a, b, c, d in zip(cx, cy, bw, bh)))
    splits = "".join(f"{s}: images/{s}\n" for s in per_split)
    (dest / "data.yaml").write_text(f"path: .\n{splits}names:\n  0: coin\n")
    return dest
