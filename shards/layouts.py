"""The three raw layouts (imagefolder, unlabeled, yolo): detecting them and listing their inputs."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

import fsspec
import yaml

from shards.keys import sample_key
from shards.storage import StoreError, is_local, join, special_file

Layout = Literal["imagefolder", "unlabeled", "yolo"]

# torchvision's ImageFolder extensions, plus GIF and JPEG's other names (.jfif, .jpe: what browsers save); anything
# else in SRC is not an input. The format is read from the bytes, not the name.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Photo formats that cameras, phones and browsers write and convert does not read: skipped, but counted and named,
# as a folder of iPhone HEICs would otherwise convert to nothing without a word.
UNREAD_PHOTO_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf",
                           ".rw2")
SPLIT_DIRS = ("train", "val", "test")
YOLO_YAMLS = ("data.yaml", "data.yml")
# A labeled source without split folders holds out this share of its inputs as val by default.
DEFAULT_VAL_FRACTION = 0.05
HOLDOUT_SPLIT = "val"
HOLDOUT_RULE = "val when int.from_bytes(sha256(key)[:8], 'big') < fraction * 2**64, else train"


@dataclass(frozen=True)
class Input:
    """One raw image to convert: its path relative to SRC, its split and its label source."""

    relpath: str
    key: str
    split: str
    cls: int | None = None  # imagefolder class index
    label_relpath: str | None = None  # yolo label file (may not exist: no objects)


@dataclass(frozen=True)
class Listing:
    layout: Layout
    classes: list[str]
    inputs: list[Input]
    reason: str  # why auto detection chose this layout (or "given")
    skipped: list[str]  # what SRC holds and convert did not read, each "relpath: why" (symlink loops, unreadable
    # folders, photos in formats it does not read)
    split_folders: bool = False  # a labeled source naming its splits: SRC/train|val|test/..., yolo images/<split>/
    holdout: float | None = None  # share held out as val (no split folders); None: the source's splits as they are
    # yolo: the folders labels/NAME/ holding .txt files where images/ has split folders but no NAME among them
    unmatched_label_folders: list[str] = field(default_factory=list)

    def label_folders(self) -> dict[str, list[str]]:
        """yolo: per split, the folders its images' label files are looked for in: labels/<split>/ for
        images/<split>/..., labels/ itself for images straight under images/ (a holdout's val among them)."""
        folders: dict[str, set[str]] = {}
        for inp in self.inputs:
            if inp.label_relpath is not None:
                parts = inp.label_relpath.split("/")
                folders.setdefault(inp.split, set()).add("/".join(parts[:2] if len(parts) > 2 else parts[:1]) + "/")
        return {split: sorted(found) for split, found in folders.items()}

    def untrained_classes(self) -> list[str]:
        """imagefolder: a line for each class with images but none in train (a one-image class whose image the
        holdout drew, a class folder under val/ only): a classifier would never learn it."""
        per_class: dict[int, Counter[str]] = {}
        for inp in self.inputs:
            if inp.cls is not None:
                per_class.setdefault(inp.cls, Counter())[inp.split] += 1
        return [f"class {self.classes[c]} has no train image (its {sum(n.values())} in "
                f"{', '.join(sorted(n))}): a classifier never learns it"
                for c, n in sorted(per_class.items()) if not n["train"]]


def list_source(fs: fsspec.AbstractFileSystem, root: str, layout: Layout | Literal["auto"]) -> Listing:
    """Every input under `root` in listing order (sorted relative paths), for `layout` or auto, in the split
    its folder names (train where none does; `with_holdout` then holds some out)."""
    relpaths, skipped = image_relpaths(fs, root)
    if layout == "auto":
        layout, reason = detect_layout(fs, root, relpaths)
    else:
        reason = "given"
    if not relpaths:
        raise StoreError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    unmatched: list[str] = []
    if layout == "imagefolder":
        classes, inputs = imagefolder_inputs(relpaths)
    elif layout == "unlabeled":
        classes, inputs = [], unlabeled_inputs(relpaths)
    else:
        classes, inputs = yolo_classes(fs, root), yolo_inputs(relpaths)
        if not inputs:
            raise StoreError(f"yolo layout: no images under {join(root, 'images')}")
        labels = yolo_label_files(fs, root)
        check_yolo_labels(fs, root, inputs, labels)
        unmatched = unmatched_label_folders(inputs, labels)
    split_folders = layout != "unlabeled" and has_split_folders(layout, relpaths)
    return Listing(layout, classes, inputs, reason, skipped, split_folders, unmatched_label_folders=unmatched)


def with_holdout(listing: Listing, val_fraction: float | None, root: str) -> Listing:
    """`listing` with, for a labeled source without split folders, `val_fraction` of its inputs (None: the
    default) held out as val, chosen by a hash of each key; a source with split folders refuses a fraction
    above 0."""
    holdout = holdout_fraction(listing, val_fraction, root)
    if not holdout:
        return replace(listing, holdout=holdout)
    inputs = [replace(inp, split=holdout_split(inp.key, holdout)) for inp in listing.inputs]
    return replace(listing, inputs=inputs, holdout=holdout)


def has_split_folders(layout: str, relpaths: list[str]) -> bool:
    """Whether a labeled source names its splits: yolo images/<split>/..., imagefolder SRC/train|val|test/..."""
    if layout == "yolo":
        return any(r.startswith("images/") and r.count("/") > 1 for r in relpaths)
    return all(_split_of(r.split("/"))[0] for r in relpaths)


def holdout_fraction(listing: Listing, val_fraction: float | None, root: str) -> float | None:
    """The share of a labeled source without split folders that goes to val; None where the source's
    own splits (or, unlabeled, everything in train) are kept."""
    layout = listing.layout
    if layout != "unlabeled" and not listing.split_folders:
        return DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if val_fraction:
        if layout == "unlabeled":
            raise StoreError(f"--val-fraction {val_fraction}: a holdout applies to the imagefolder and yolo "
                             "layouts, not unlabeled")
        splits = sorted({inp.split for inp in listing.inputs})  # those found, not every name that counts as one
        found = ", ".join(s if layout == "imagefolder" else f"images/{s}/" for s in splits)
        raise StoreError(f"--val-fraction {val_fraction}: {root} already has split folders ({found}), "
                         "which are kept as they are; leave --val-fraction out")
    return None


def holdout_split(key: str, fraction: float) -> str:
    """val or train from the sample key alone (HOLDOUT_RULE): the same on every machine and every night,
    so an appended image lands where it always will and a stored one never moves."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return HOLDOUT_SPLIT if int.from_bytes(digest[:8], "big") < fraction * 2**64 else "train"


def image_relpaths(fs: fsspec.AbstractFileSystem, root: str) -> tuple[list[str], list[str]]:
    """Sorted posix paths relative to `root` of the files with image extensions, hidden ones left out;
    and what was not read, each as "relpath: why": folders, photos in formats convert does not read, hidden images.

    Broken symlinks are listed too: they become `unreadable` rejects rather than vanishing.
    """
    if not fs.isdir(root):
        what = "is not a directory" if fs.exists(root) else "does not exist"
        raise StoreError(f"source {root} {what}")
    skipped: list[str] = []
    found = file_relpaths(fs, root, root, skipped)
    visible = sorted(r for r in found if not any(part.startswith(".") for part in r.split("/")))
    relpaths = [r for r in visible if r.lower().endswith(IMAGE_EXTENSIONS)]
    unread = [r for r in visible if r.lower().endswith(UNREAD_PHOTO_EXTENSIONS)]
    if unread:
        skipped.append(unread_photos(unread))
    # hidden folders are never read (local ones not even walked); a hidden image in a visible one is named
    hidden = sorted(r for r in found if r.lower().endswith(IMAGE_EXTENSIONS) and r.rsplit("/", 1)[-1].startswith(".")
                    and not any(part.startswith(".") for part in r.split("/")[:-1]))
    if hidden:
        more = f" and {len(hidden) - 1} more" if len(hidden) > 1 else ""
        skipped.append(f"{hidden[0]}{more}: hidden files (a name starting with '.', as macOS's ._ copies), not read; "
                       "rename them to convert them")
    return relpaths, sorted(skipped)


def unread_photos(relpaths: list[str]) -> str:
    """One `skipped` line for the photos in formats convert does not read: the first, the count by format."""
    counts = Counter(os.path.splitext(r)[1].lower() for r in relpaths)
    formats = ", ".join(f"{ext} {n}" for ext, n in counts.most_common())
    more = f" and {len(relpaths) - 1} more" if len(relpaths) > 1 else ""
    return (f"{relpaths[0]}{more}: photos in formats convert does not read ({formats}); save them as JPEG "
            "(or another of " + ", ".join(IMAGE_EXTENSIONS) + ") to convert them")


def file_relpaths(fs: fsspec.AbstractFileSystem, root: str, folder: str, skipped: list[str]) -> list[str]:
    """Posix paths relative to `root` of the files under `folder` (`root` or a folder in it); the folders
    that were not read are added to `skipped`."""
    found = walk_local(folder, skipped) if is_local(fs) else fs.find(folder, withdirs=False)
    prefix = root.rstrip("/") + "/"
    return [p[len(prefix):] for p in found if p.startswith(prefix)]


def walk_local(root: str, skipped: list[str]) -> list[str]:
    """Every file under `root`, following symlinked folders as torchvision's ImageFolder does (fsspec's
    local find does not descend into them), but never into a folder it is already inside: a symlink
    loop would repeat the tree ever deeper. Loops and unreadable folders are added to `skipped`."""
    def rel(path: str) -> str:
        r = os.path.relpath(path, root).replace(os.sep, "/")
        return root if r == "." else r

    def unreadable(e: OSError) -> None:
        skipped.append(f"{rel(e.filename)}: cannot read the folder ({e.strerror})")

    files = []
    # per folder to walk: the folders it is inside, itself included
    inside: dict[str, tuple[tuple[int, int], ...]] = {root: (folder_id(root),)}
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unreadable):
        chain = inside.pop(folder)
        for name in list(subfolders):
            path = os.path.join(folder, name)
            if name.startswith("."):
                subfolders.remove(name)  # hidden: nothing in it is an input
                continue
            try:
                ident = folder_id(path)
            except OSError:
                inside[path] = chain  # os.walk cannot list it either, and reports it through `unreadable`
                continue
            if ident in chain:
                subfolders.remove(name)
                skipped.append(f"{rel(path)}: a symlink loop back to {rel(os.path.realpath(path))}, not followed")
            else:
                inside[path] = (*chain, ident)
        files += [os.path.join(folder, f).replace(os.sep, "/") for f in names]
    return files


def folder_id(path: str) -> tuple[int, int]:
    """What identifies a folder however it is reached (through symlinks or not)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def detect_layout(fs: fsspec.AbstractFileSystem, root: str, relpaths: list[str]) -> tuple[Layout, str]:
    if any(fs.exists(join(root, name)) for name in YOLO_YAMLS) and any(r.startswith("images/") for r in relpaths):
        return "yolo", "data.yaml and images/ found"
    flat = [r for r in relpaths if r.count("/") == 1]
    in_splits = [r for r in relpaths if r.count("/") == 2 and r.split("/", 1)[0] in SPLIT_DIRS]
    if len(flat) == len(relpaths):
        return "imagefolder", "every image is in a class folder SRC/<class>/"
    if len(in_splits) == len(relpaths):
        return "imagefolder", "every image is in SRC/<split>/<class>/"
    # Named, so that one nested or stray file turning a class-folder source unlabeled is seen and fixed
    shape = set(flat if len(flat) >= len(in_splits) else in_splits)
    odd = next(r for r in relpaths if r not in shape)
    return "unlabeled", (f"images are not all exactly one class folder deep, {odd} for one; --layout imagefolder "
                         "takes each image's first folder (below train|val|test) as its class")


def _split_of(parts: list[str]) -> tuple[str | None, list[str]]:
    """The split named by the first directory (train/val/test), and the rest of the path."""
    if len(parts) > 1 and parts[0] in SPLIT_DIRS:
        return parts[0], parts[1:]
    return None, parts


def imagefolder_inputs(relpaths: list[str]) -> tuple[list[str], list[Input]]:
    """SRC/<class>/... or SRC/<split>/<class>/...; classes sorted as torchvision's ImageFolder does."""
    with_splits = has_split_folders("imagefolder", relpaths)
    placed = []
    for r in relpaths:
        split, rest = _split_of(r.split("/")) if with_splits else (None, r.split("/"))
        if len(rest) < 2:
            where = f"{split}/" if split else ""
            raise StoreError(f"imagefolder layout: {r} is not inside a class folder SRC/{where}<class>/")
        placed.append((r, split or "train", rest[0]))
    classes = sorted({c for _, _, c in placed})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [Input(r, sample_key(r), split, cls=index[c]) for r, split, c in placed]


def unlabeled_inputs(relpaths: list[str]) -> list[Input]:
    """Any tree; top-level train/val/test folders become splits, everything else is train."""
    return [Input(r, sample_key(r), _split_of(r.split("/"))[0] or "train") for r in relpaths]


def yolo_inputs(relpaths: list[str]) -> list[Input]:
    """images/<split>/...; the label of images/<split>/a/b.jpg is labels/<split>/a/b.txt."""
    inputs = []
    for r in relpaths:
        parts = r.split("/")
        if parts[0] != "images":
            continue  # not part of a YOLO set (previews, plots next to data.yaml)
        split = parts[1] if len(parts) > 2 else "train"
        label = "/".join(["labels", *parts[1:]]).rpartition(".")[0] + ".txt"
        inputs.append(Input(r, sample_key(r), split, label_relpath=label))
    return inputs


def yolo_label_files(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """The paths relative to `root` of the files under labels/ (none where there is no labels/)."""
    folder = join(root, "labels")
    return set(file_relpaths(fs, root, folder, [])) if fs.isdir(folder) else set()


def check_yolo_labels(fs: fsspec.AbstractFileSystem, root: str, inputs: list[Input], labels: set[str]) -> None:
    """Refuse a yolo set in which no image has a label file (of `labels`, yolo_label_files'): it would train on
    no boxes at all, and is surely a missing or misnamed labels/ folder. (Some images without one are background
    images, as in YOLO.)"""
    if any(inp.label_relpath in labels for inp in inputs):
        return
    folder = join(root, "labels")
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True) if e["type"] == "directory")
    near = sorted(n for n in names if n.lower() in ("labels", "label") and n != "labels")
    hint = f"; there is {', '.join(n + '/' for n in near)}: YOLO's folder is labels/" if near else ""
    raise StoreError(f"yolo layout: none of the {len(inputs)} images has a label file: looked in {folder}/ "
                     f"(images/<split>/NAME.jpg -> labels/<split>/NAME.txt){hint}")


def unmatched_label_folders(inputs: list[Input], labels: set[str]) -> list[str]:
    """The folders labels/NAME/ that hold .txt files (of `labels`) where images/ has split folders but no
    images/NAME/: most likely a misnamed split (labels/valid/ beside images/val/), whose images then hold no
    boxes, which convert only warns of. Without split folders in images/ no label folder is a split's: none."""
    splits = {inp.relpath.split("/")[1] for inp in inputs if inp.relpath.count("/") > 1}
    if not splits:
        return []
    folders = {path.split("/")[1] for path in labels if path.count("/") > 1 and path.lower().endswith(".txt")}
    return sorted(folders - splits)


def yolo_classes(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The class names from data.yaml's `names`, a list or a dict {0: name, 1: name, ...}."""
    path = next((join(root, n) for n in YOLO_YAMLS if fs.exists(join(root, n))), None)
    if path is None:
        raise StoreError(f"yolo layout: no data.yaml in {root}")
    kind = special_file(fs, path)
    if kind:
        raise StoreError(f"yolo layout: {path} is {kind}, not a regular file")
    try:
        data = yaml.safe_load(fs.cat_file(path))
    except yaml.YAMLError as e:
        raise StoreError(f"yolo layout: {path} is not valid YAML: {yaml_problem(e)}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            ids = []
        if ids != list(range(len(names))):
            raise StoreError(f"yolo layout: {path} `names` keys must be 0..{len(names) - 1}")
        names = [names[k] if k in names else names[str(k)] for k in ids]
    if not isinstance(names, list) or not names:
        raise StoreError(f"yolo layout: {path} has no `names` list or dict")
    # YAML reads an empty entry as null and `3` as a number: the classes became "None" and "3" without a word
    odd = next((i for i, n in enumerate(names) if not isinstance(n, (str, int)) or isinstance(n, bool)), None)
    if odd is not None:
        raise StoreError(f"yolo layout: {path} `names` entry {odd} is {names[odd]!r}, not a class name")
    classes = [str(n) for n in names]
    twice = next((n for i, n in enumerate(classes) if n in classes[:i]), None)
    if twice is not None:
        raise StoreError(f"yolo layout: {path} `names` has {twice!r} more than once: each class id needs its own name")
    return classes


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line, with where it is: PyYAML's own text spans several lines, quoting the source, and
    its first line alone ("while parsing a block mapping") says neither what is wrong nor where."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem is None or mark is None:
        return str(e).splitlines()[0]
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    within = f" ({context} from line {start.line + 1}, column {start.column + 1})" if context and start else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}{within}"
