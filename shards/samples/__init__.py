"""Raw folders made from the bundled photos, for the demo, the tests and the benchmarks.

The photos (see LICENSE.md beside this file) are real; the folders are cut from them
with a seeded RNG, so the same seed always gives the same files:

- `make_imagefolder`: one class per photo (or per region of a photo), each image a random crop
  of it, written class by class into class folders as real sources are.
- `make_unlabeled`: random crops of all photos in a nested tree.
- `make_yolo`: crops of the photos ("objects", one class each) pasted onto the
  grayscale texture photos, with their YOLO boxes and a `data.yaml`.
"""

from __future__ import annotations

import random
from pathlib import Path

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
    return img.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)


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
            lines, placed = [], []
            for _ in range(rng.randint(1, max_objects)):
                cls = rng.randrange(len(names))
                w, h = rng.randint(size // 5, size // 2), rng.randint(size // 5, size // 2)
                x, y = rng.randint(0, size - w), rng.randint(0, size - h)
                if any(x < px + pw and px < x + w and y < py + ph and py < y + h for px, py, pw, ph in placed):
                    continue  # objects never overlap, so every box is fully visible
                placed.append((x, y, w, h))
                canvas.paste(objects[cls].resize((w, h), Image.BILINEAR), (x, y))
                lines.append(f"{cls} {(x + w / 2) / size:.6f} {(y + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            canvas.save(dest / "images" / split / f"img_{i:04d}.jpg", quality=90)
            (dest / "labels" / split / f"img_{i:04d}.txt").write_text("\n".join(lines) + "\n")
    names_yaml = "\n".join(f"  {i}: {n}" for i, n in enumerate(names))
    (dest / "data.yaml").write_text(
        f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names_yaml}\n"
    )
    return dest
