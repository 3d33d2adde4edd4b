"""shards.convert on good inputs: every input in exactly one shard with its label, determinism,
shard sizes, --append, and an S3 round trip against the moto server."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from shards import ConvertOptions, StoreError, convert, inspect_store, read_manifest, samples, verify
from shards.keys import order_key, sample_key
from shards.layouts import holdout_split
from tests.test_shards_cli import shardtrain
from tests.test_shards_reader import read_store


def run(src, dest, **kw):
    return convert(ConvertOptions(src=str(src), dest=str(dest), workers=kw.pop("workers", 1), **kw), progress=False)


def image_files(src: Path) -> list[str]:
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg"))


def manifest_digests(dest) -> dict[str, str]:
    m = read_manifest(str(dest))
    return {s.name: s.sha256 for split in m.splits.values() for s in split.shards}


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
def test_imagefolder_every_input_once_with_its_class(imagefolder_src, tmp_path, fmt):
    summary = run(imagefolder_src, tmp_path / "s", format=fmt, shard_size="7samples")
    stored = read_store(tmp_path / "s")
    manifest = read_manifest(str(tmp_path / "s"))
    files = image_files(imagefolder_src)
    assert summary.added == len(files) == len(stored) and summary.rejected == 0
    assert manifest.classes == sorted(p.name for p in (imagefolder_src / "train").iterdir())
    for rel in files:
        split, cls_name, _ = rel.split("/")
        sample = stored[sample_key(rel)]
        assert sample["split"] == split
        assert manifest.classes[sample["cls"]] == cls_name
        assert sample["image"] == (imagefolder_src / rel).read_bytes()  # original bytes kept
    assert all(s.samples <= 7 for split in manifest.splits.values() for s in split.shards)
    assert manifest.totals.samples == len(files) and manifest.layout == "imagefolder"
    assert verify(str(tmp_path / "s"), deep=True) == []


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
def test_yolo_boxes_and_labels(yolo_src, tmp_path, fmt):
    summary = run(yolo_src, tmp_path / "s", format=fmt)
    stored = read_store(tmp_path / "s")
    assert summary.layout == "yolo" and summary.added == len(image_files(yolo_src)) == len(stored)
    assert read_manifest(str(tmp_path / "s")).classes == samples.class_names()
    for rel in image_files(yolo_src):
        label = (yolo_src / rel.replace("images/", "labels/", 1)).with_suffix(".txt").read_text().split("\n")
        rows = [list(map(float, line.split())) for line in label if line.strip()]
        sample = stored[sample_key(rel)]
        assert sample["split"] == rel.split("/")[1]
        assert sample["labels"] == [int(r[0]) for r in rows]
        assert sample["boxes"] == [r[1:] for r in rows]


def test_the_manifest_counts_each_yolo_split_s_boxes_and_records_none_for_other_layouts(yolo_src, imagefolder_src,
                                                                                          tmp_path):
    run(yolo_src, tmp_path / "y", shard_size="5samples")
    manifest = read_manifest(str(tmp_path / "y"))
    assert len(manifest.splits["train"].shards) > 1
    for split, entry in manifest.splits.items():
        lines = [line for f in (yolo_src / "labels" / split).glob("*.txt") for line in f.read_text().splitlines()
                 if line.strip()]
        assert entry.boxes == len(lines) > 0
        assert sum(s.boxes or 0 for s in entry.shards) == entry.boxes
        assert inspect_store(str(tmp_path / "y"))["splits"][split]["boxes"] == entry.boxes
    run(imagefolder_src, tmp_path / "i")
    assert "boxes" not in (tmp_path / "i" / "manifest.json").read_text()
    assert {s.boxes for s in read_manifest(str(tmp_path / "i")).splits.values()} == {None}


def test_a_yolo_split_without_label_files_is_stored_with_a_warning(tmp_path):
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 6, "val": 3}, size=64)
    shutil.rmtree(src / "labels" / "val")  # e.g. the val labels went to another folder
    result = shardtrain("convert", src, tmp_path / "s", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert ("warning: split val holds no boxes: none of its 3 images has a label line (looked in labels/val/); a "
            "detector learns nothing from it and cannot be evaluated on it") in result.stderr
    assert "warning: split train" not in result.stderr
    assert read_manifest(str(tmp_path / "s")).splits["val"].boxes == 0
    assert "3 (0 boxes)" in shardtrain("inspect", tmp_path / "s").stdout


def test_the_boxless_split_warning_names_label_folders_that_match_no_split_of_images(tmp_path):
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 6, "val": 3}, size=64)
    (src / "labels" / "val").rename(src / "labels" / "valid")  # as some exporters name it
    (src / "labels" / "notes").mkdir()  # holds no .txt file: not a label folder
    (src / "labels" / "notes" / "readme.md").write_text("relabelled in May")
    result = shardtrain("convert", src, tmp_path / "s", "--workers", "1")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: split val holds no boxes: none of its 3 images has a label line (looked in "
                        "labels/val/; labels/ also has valid/, which is no split of images/); a detector learns "
                        "nothing from it and cannot be evaluated on it"]


def test_the_boxless_split_warning_of_a_flat_yolo_set_says_its_labels_are_in_labels(tmp_path):
    """Without split folders the held-out val images' labels are labels/NAME.txt, as the others' are; a folder
    under labels/ is then no misnamed split, and is not named."""
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 12}, size=64)
    for kind in ("images", "labels"):
        for path in (src / kind / "train").iterdir():
            path.rename(src / kind / path.name)
    (src / "labels" / "train").rename(src / "labels" / "old")
    (src / "labels" / "old" / "img_0000.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    held_out = [p for p in (src / "images").glob("*.jpg")
                if holdout_split(sample_key(f"images/{p.name}"), 0.3) == "val"]
    assert 0 < len(held_out) < 12
    for image in held_out:
        (src / "labels" / f"{image.stem}.txt").unlink()
    summary = run(src, tmp_path / "s", val_fraction=0.3)
    assert summary.boxless_splits() == [
        f"split val holds no boxes: none of its {len(held_out)} images has a label line (looked in labels/); a "
        "detector learns nothing from it and cannot be evaluated on it"]


def test_a_class_without_a_train_image_is_stored_with_a_warning(tmp_path):
    # before, a class only val/ held (or whose one image the holdout drew) trained unsaid as a class never seen
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2, "val": 1}, size=32,
                                   classes=["chelsea", "rocket"])
    samples.make_imagefolder(tmp_path / "more", per_class={"val": 2}, size=32, classes=["coffee"], seed=3)
    shutil.copytree(tmp_path / "more" / "val" / "coffee", src / "val" / "coffee")
    result = shardtrain("convert", src, tmp_path / "s", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "warning: class coffee has no train image (its 2 in val): a classifier never learns it" in result.stderr
    assert "class chelsea" not in result.stderr and "class rocket" not in result.stderr
    assert run(src, tmp_path / "s2").untrained_classes == [
        "class coffee has no train image (its 2 in val): a classifier never learns it"]


def test_unlabeled_tree_and_split_folders(tmp_path):
    src = tmp_path / "src"
    for seed, folder in enumerate(["train/day1", "val", "misc", "."]):
        samples.make_unlabeled(src / folder, count=6, size=32, seed=seed)
    summary = run(src, tmp_path / "s", format="lmdb")
    stored = read_store(tmp_path / "s")
    assert summary.layout == "unlabeled"  # images at several depths: not class folders
    for rel in image_files(src):
        sample = stored[sample_key(rel)]
        assert sample["split"] == ("val" if rel.startswith("val/") else "train")
        assert set(sample) == {"split", "shard", "ext", "image"}  # image alone, no label
    assert len(stored) == len(image_files(src)) and read_manifest(str(tmp_path / "s")).classes == []


def test_symlinked_class_folder_is_followed(imagefolder_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for cls in ("chelsea", "rocket"):
        (src / cls).symlink_to(imagefolder_src / "train" / cls, target_is_directory=True)
    summary = run(src, tmp_path / "s", val_fraction=0)
    assert summary.layout == "imagefolder" and summary.added == 2 * len(
        image_files(imagefolder_src / "train" / "rocket")
    )


def test_imagefolder_without_splits_and_forced_layout(imagefolder_src, tmp_path):
    src = imagefolder_src / "train"
    auto = run(src, tmp_path / "a", format="wds", val_fraction=0)
    assert auto.layout == "imagefolder" and auto.splits == {"train": len(image_files(src))}
    forced = run(src, tmp_path / "b", layout="unlabeled")
    assert forced.layout == "unlabeled"
    assert {s["split"] for s in read_store(tmp_path / "b").values()} == {"train"}
    with pytest.raises(StoreError, match="not inside a class folder"):
        run(imagefolder_src / "train" / "chelsea", tmp_path / "c", layout="imagefolder")


def test_auto_names_the_file_that_makes_a_class_folder_source_unlabeled(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3}, size=32, classes=["chelsea", "rocket"],
                                   flat=True)
    (src / "rocket" / "2024").mkdir()
    (src / "rocket" / "rocket_0002.jpg").rename(src / "rocket" / "2024" / "[b].jpg")  # [b]: not rich markup
    result = shardtrain("convert", src, tmp_path / "s", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        "layout: unlabeled (auto: images are not all exactly one class folder deep, rocket/2024/[b].jpg for one; "
        "--layout imagefolder takes each image's first folder (below train|val|test) as its class); 6 inputs")
    forced = run(src, tmp_path / "f", layout="imagefolder", val_fraction=0)
    assert forced.layout == "imagefolder" and read_manifest(str(tmp_path / "f")).classes == ["chelsea", "rocket"]
    (src / "rocket" / "2024" / "[b].jpg").rename(src / "train.jpg")  # a stray file in SRC, beside the folders
    assert "auto: images are not all exactly one class folder deep, train.jpg for one;" in \
        shardtrain("convert", src, tmp_path / "s2", "--workers", "1").stderr


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
def test_same_shards_whatever_the_worker_count(imagefolder_src, tmp_path, fmt):
    one = run(imagefolder_src, tmp_path / "w1", format=fmt, shard_size="40KB", workers=1)
    two = run(imagefolder_src, tmp_path / "w2", format=fmt, shard_size="40KB", workers=2)
    assert one.shards_written == two.shards_written and len(one.shards_written) > 2
    assert manifest_digests(tmp_path / "w1") == manifest_digests(tmp_path / "w2")
    for name in one.shards_written:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_shard_size_in_bytes(imagefolder_src, tmp_path):
    run(imagefolder_src, tmp_path / "s", shard_size="20KB")
    manifest = read_manifest(str(tmp_path / "s"))
    train = manifest.splits["train"].shards
    assert len(train) > 3
    # every shard but the last is as full as 20KB allows (one more sample would pass it)
    assert all(s.bytes < 20_000 + 12_000 for s in train)
    with pytest.raises(ValueError, match="shard size"):
        ConvertOptions(src="a", dest="b", shard_size="12 parsecs")


def test_append_adds_only_new_inputs_then_is_a_noop(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 3, "val": 1}, size=32)
    first = run(src, tmp_path / "s", format="lmdb")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir() if p.is_file()}
    samples.make_imagefolder(src, per_class={"train": 2}, size=32, seed=1, start=100)
    second = run(src, tmp_path / "s", format="lmdb", append=True)
    assert second.version == 2 and second.added == 2 * len(samples.class_names())
    assert second.unchanged == first.added
    manifest = read_manifest(str(tmp_path / "s"))
    for name in first.shards_written:
        assert (tmp_path / "s" / name).stat().st_mtime_ns == before[name]  # old shards untouched
    assert [s.version for s in manifest.splits["train"].shards] == [1, 2]
    assert len(read_store(tmp_path / "s")) == len(image_files(src))
    snapshot = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    third = run(src, tmp_path / "s", format="lmdb", append=True)
    assert third.added == 0 and third.version == 2 and third.shards_written == []
    assert {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()} == snapshot
    assert verify(str(tmp_path / "s")) == []


def stored_keys(dest: Path, shards: list[str]) -> list[str]:
    """The sample keys of these shards, in the order the shards hold them."""
    indexes = [json.loads((dest / "_index" / f"{name}.json").read_text()) for name in shards]
    return [item["key"] for index in indexes for item in index["items"]]


def test_samples_are_written_in_a_seeded_order_and_an_append_mixes_its_own(tmp_path):
    """A source listed class by class is not stored class by class: each split's samples follow
    sha1(seed:key), across all its shards, and an --append orders its new samples the same way."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 6}, size=32)
    first = run(src, tmp_path / "s", shard_size="10samples")
    keys = stored_keys(tmp_path / "s", first.shards_written)
    assert keys == sorted(keys, key=lambda k: order_key(k, 0)) and keys != sorted(keys)
    assert inspect_store(str(tmp_path / "s"))["splits"]["train"]["classes_per_shard"]["min"] >= 4
    samples.make_imagefolder(src, per_class={"train": 4}, size=32, seed=1, start=100)
    second = run(src, tmp_path / "s", shard_size="10samples", append=True)
    new = stored_keys(tmp_path / "s", second.shards_written)
    assert len(new) == 4 * len(samples.class_names()) and new == sorted(new, key=lambda k: order_key(k, 0))
    assert read_manifest(str(tmp_path / "s")).order.model_dump() == {"rule": "key-hash", "seed": 0, "since_version": 1}
    other = run(src, tmp_path / "other", shard_size="10samples", seed=7)
    assert stored_keys(tmp_path / "other", other.shards_written) != keys + new
    samples.make_imagefolder(src, per_class={"train": 1}, size=32, seed=2, start=200)
    with pytest.raises(StoreError, match="--seed 0, not 7"):
        run(src, tmp_path / "s", shard_size="10samples", append=True, seed=7)


def test_append_rejects_changed_content_and_keeps_the_stored_sample(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea", "rocket"])
    run(src, tmp_path / "s")
    victim = src / "train" / "rocket" / "rocket_0000.jpg"
    original = victim.read_bytes()
    shutil.copy(samples.PHOTOS_DIR / "coffee.jpg", victim)
    summary = run(src, tmp_path / "s", append=True)
    assert (summary.added, summary.rejected, summary.version) == (0, 1, 1)
    reject = json.loads((tmp_path / "s" / "rejects.jsonl").read_text())
    assert (reject["path"], reject["reason"]) == ("train/rocket/rocket_0000.jpg", "changed")
    assert read_store(tmp_path / "s")[sample_key("train/rocket/rocket_0000.jpg")]["image"] == original
    again = run(src, tmp_path / "s", append=True)  # the same change is not reported twice
    assert (again.added, again.rejected) == (0, 0)
    assert read_manifest(str(tmp_path / "s")).rejects == 1


def changed_rejects(dest: Path) -> dict[str, str]:
    lines = (json.loads(line) for line in (dest / "rejects.jsonl").read_text().splitlines())
    return {r["path"]: r["detail"] for r in lines if r["reason"] == "changed"}


def test_append_rejects_an_edited_removed_or_added_yolo_label_and_keeps_the_stored_boxes(tmp_path):
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 6}, size=64)
    labels = src / "labels" / "train"
    (labels / "img_0003.txt").unlink()  # a background image: no label file
    run(src, tmp_path / "s")
    before = read_store(tmp_path / "s")
    assert (run(src, tmp_path / "s", append=True).unchanged, read_manifest(str(tmp_path / "s")).rejects) == (6, 0)

    (labels / "img_0001.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (labels / "img_0002.txt").unlink()
    (labels / "img_0003.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    summary = run(src, tmp_path / "s", append=True)
    assert (summary.added, summary.rejected, summary.unchanged, summary.version) == (0, 3, 3, 1)
    assert summary.rejected_by_reason == {"changed": 3}
    details = changed_rejects(tmp_path / "s")
    key = {n: sample_key(f"images/train/img_000{n}.jpg") for n in (1, 2, 3)}
    assert details == {
        "images/train/img_0001.jpg": f"label labels/train/img_0001.txt differs from the stored sample {key[1]}'s "
                                     "(kept; to take the change, convert the source into a new, empty DEST and "
                                     "train on that store)",
        "images/train/img_0002.jpg": f"label labels/train/img_0002.txt is now missing or empty, unlike the stored "
                                     f"sample {key[2]}'s (kept; to take the change, convert the source into a new, "
                                     "empty DEST and train on that store)",
        "images/train/img_0003.jpg": f"label labels/train/img_0003.txt differs from the stored sample {key[3]}'s "
                                     "(kept; to take the change, convert the source into a new, empty DEST and "
                                     "train on that store)",
    }
    assert read_store(tmp_path / "s") == before
    again = run(src, tmp_path / "s", append=True)  # the same changes are not reported twice
    assert (again.rejected, again.unchanged) == (0, 6)
    (labels / "img_0001.txt").write_text("0 0.4 0.4 0.1 0.1\n")  # another edit is
    assert run(src, tmp_path / "s", append=True).rejected == 1


def test_append_onto_a_store_without_label_digests_checks_images_alone(tmp_path):
    """A yolo store converted before label digests were recorded: its labels are not compared, so an append
    reports none of its samples as changed; a changed image still is."""
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 4}, size=64)
    dest = tmp_path / "s"
    run(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:  # as an older shardtrain wrote them
        index = dest / "_index" / f"{shard['name']}.json"
        data = json.loads(index.read_text())
        assert all(item.pop("label_sha1") for item in data["items"])
        index.write_text(json.dumps(data))
        shard["index_sha256"] = hashlib.sha256(index.read_bytes()).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest))
    (src / "labels" / "train" / "img_0001.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    assert (run(src, dest, append=True).rejected, read_manifest(str(dest)).rejects) == (0, 0)
    shutil.copy(samples.PHOTOS_DIR / "coffee.jpg", src / "images" / "train" / "img_0002.jpg")
    assert list(changed_rejects(dest)) == [] and run(src, dest, append=True).rejected == 1
    assert list(changed_rejects(dest)) == ["images/train/img_0002.jpg"]


def test_existing_store_needs_append(imagefolder_src, tmp_path):
    run(imagefolder_src, tmp_path / "s")
    assert run(imagefolder_src, tmp_path / "s").added == 0  # the same command again: nothing to do
    src = tmp_path / "src"
    shutil.copytree(imagefolder_src, src)
    new = next(src.rglob("*.jpg"))
    shutil.copy(new, new.with_name("new.jpg"))
    with pytest.raises(StoreError, match="--append"):
        run(src, tmp_path / "s")
    with pytest.raises(StoreError, match="format"):
        run(imagefolder_src, tmp_path / "s", format="lmdb", append=True)


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
def test_s3_round_trip(imagefolder_src, s3_bucket, fmt):
    dest = f"{s3_bucket}/stores/pets"
    summary = run(imagefolder_src, dest, format=fmt, shard_size="30samples", workers=2)
    info = inspect_store(dest)
    assert info["format"] == fmt and info["version"] == 1
    assert {k: v["samples"] for k, v in info["splits"].items()} == summary.splits
    assert sum(summary.splits.values()) == len(image_files(imagefolder_src))
    assert verify(dest, deep=True) == []
    manifest = read_manifest(dest)
    assert "testing" not in manifest.model_dump_json()  # no credentials in the manifest
    from shards import open_fs

    fs, root = open_fs(dest)
    first = manifest.splits["train"].shards[0]
    assert hashlib.sha256(fs.cat_file(f"{root}/{first.name}")).hexdigest() == first.sha256
    assert not [p for p in fs.find(root) if ".partial" in p or p.endswith(".tmp")]


def test_s3_source_gives_the_same_shards_as_local(imagefolder_src, s3_bucket, tmp_path):
    from shards import open_fs

    fs, root = open_fs(f"{s3_bucket}/raw")
    fs.put(f"{imagefolder_src}/", root, recursive=True)
    from_s3 = run(f"{s3_bucket}/raw", tmp_path / "a", shard_size="30samples", workers=2)
    run(imagefolder_src, tmp_path / "b", shard_size="30samples")
    assert from_s3.added == len(image_files(imagefolder_src))
    assert manifest_digests(tmp_path / "a") == manifest_digests(tmp_path / "b")


def split_of_each(dest) -> dict[str, str]:
    return {key: sample["split"] for key, sample in read_store(dest).items()}


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
def test_flat_class_folders_hold_out_val_by_key_hash(tmp_path, fmt):
    """No split folders: 5% by default to val, chosen by the key's hash, so an appended image falls
    on the side it would have fallen on in one conversion, and no stored image moves."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 12}, size=32, flat=True)
    first = run(src, tmp_path / "s", format=fmt)
    manifest = read_manifest(str(tmp_path / "s"))
    assert manifest.holdout is not None and manifest.holdout.fraction == 0.05 and manifest.holdout.split == "val"
    assert inspect_store(str(tmp_path / "s"))["holdout"]["fraction"] == 0.05
    night1 = split_of_each(tmp_path / "s")
    assert set(night1.values()) == {"train", "val"} and first.splits["val"] < first.splits["train"] / 5
    # The rule is the key's sha256 against the fraction, on any machine.
    for key, split in night1.items():
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        assert split == ("val" if h < 0.05 else "train")

    samples.make_imagefolder(src, per_class={"train": 12}, size=32, seed=1, start=100, flat=True)
    run(src, tmp_path / "s", format=fmt, append=True)
    night2 = split_of_each(tmp_path / "s")
    assert {k: night2[k] for k in night1} == night1  # nothing moved
    run(src, tmp_path / "once", format=fmt)  # everything converted at once: the same sides
    assert split_of_each(tmp_path / "once") == night2
    with pytest.raises(StoreError, match="holds out 0.05, and its images never change split"):
        run(src, tmp_path / "s", format=fmt, append=True, val_fraction=0.2)


def test_val_fraction_zero_larger_and_refused_with_split_folders(imagefolder_src, yolo_src, tmp_path):
    flat = imagefolder_src / "train"
    assert set(run(flat, tmp_path / "zero", val_fraction=0).splits) == {"train"}
    assert read_manifest(str(tmp_path / "zero")).holdout.fraction == 0
    half = run(flat, tmp_path / "half", val_fraction=0.5)
    assert abs(half.splits["val"] - half.splits["train"]) < len(image_files(flat)) / 3
    # the same command with another fraction: refused (before, "already holds this conversion", 0.5 kept)
    with pytest.raises(StoreError, match=r"^--val-fraction 0.3: the store at .*half holds out 0.5, and its "
                                         r"images never change split; leave --val-fraction out, or convert into an "
                                         r"empty DEST$"):
        run(flat, tmp_path / "half", val_fraction=0.3)
    assert run(flat, tmp_path / "half", val_fraction=0.5).added == 0
    with pytest.raises(StoreError, match=r"already has split folders \(train, val\), which"):
        run(imagefolder_src, tmp_path / "a", val_fraction=0.1)
    with pytest.raises(StoreError, match=r"already has split folders \(images/train/, images/val/\), which"):
        run(yolo_src, tmp_path / "b", val_fraction=0.1)
    with pytest.raises(StoreError, match="not unlabeled"):
        run(flat, tmp_path / "c", layout="unlabeled", val_fraction=0.1)
    run(imagefolder_src, tmp_path / "d")  # split folders: kept as they are, no holdout recorded
    assert read_manifest(str(tmp_path / "d")).holdout is None


def test_an_append_that_cannot_join_says_what_differs(imagefolder_src, yolo_src, tmp_path):
    """A store of a flat source holds out val by key hash: a source with split folders cannot join it (the user
    gave no --val-fraction, so none is blamed), nor can one of another layout."""
    flat = tmp_path / "flat"
    shutil.copytree(imagefolder_src / "train", flat)
    run(flat, tmp_path / "s")
    with pytest.raises(StoreError, match=r"cannot append: the store holds out 0.05 of its inputs as val by a hash "
                                         r"of their keys, and the source has split folders"):
        run(imagefolder_src, tmp_path / "s", append=True)
    with pytest.raises(StoreError, match="cannot append: the store's layout is imagefolder, the source's is yolo"):
        run(yolo_src, tmp_path / "s", append=True)
    assert read_manifest(str(tmp_path / "s")).version == 1  # nothing written


def test_flat_yolo_set_holds_out_val(yolo_src, tmp_path):
    src = tmp_path / "yolo"
    shutil.copytree(yolo_src, src)
    for sub in ("images", "labels"):  # images/train/x.jpg -> images/x.jpg: no split folders
        for f in (src / sub / "train").iterdir():
            f.rename(src / sub / f.name)
        shutil.rmtree(src / sub / "train")
        shutil.rmtree(src / sub / "val")
    summary = run(src, tmp_path / "s", val_fraction=0.25)
    assert summary.layout == "yolo" and set(summary.splits) == {"train", "val"}
    stored = read_store(tmp_path / "s")
    for rel in image_files(src / "images"):
        sample = stored[sample_key(f"images/{rel}")]
        label = (src / "labels" / rel).with_suffix(".txt").read_text().split()
        assert sample["labels"][0] == int(label[0])  # labels travel with their image to either split


def test_a_class_whose_train_images_are_all_rejected_is_named(tmp_path):
    # before, a class whose every train image was rejected converted with a count of rejects only, and trained
    # unsaid as a class never seen
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2, "val": 1}, size=32,
                                   classes=["chelsea", "coffee", "rocket"])
    for path in (src / "train" / "coffee").iterdir():
        path.write_bytes(path.read_bytes()[:200])  # cut off inside its header
    result = shardtrain("convert", src, tmp_path / "s", "--workers", "1")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: class coffee: none of its 2 train images is stored (truncated 2): a classifier "
                        "never learns it"]
    assert run(src, tmp_path / "s2").rejected_classes == [warnings[0].removeprefix("warning: ")]
