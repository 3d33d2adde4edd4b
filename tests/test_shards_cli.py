"""`shardtrain convert | inspect | verify`: outputs, errors, exit codes.

The root app (flows.cli) runs in-process through typer's CliRunner; the console script itself
runs once as a subprocess (its start-up imports every package, which takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
from typer.testing import CliRunner

from flows.cli import app
from shards import ConvertOptions, convert, read_manifest, samples, verify

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


def shardtrain(*args: str):
    """The root CLI in this process; the result has exit_code, stdout and stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_convert_inspect_verify(imagefolder_src, tmp_path):
    dest = tmp_path / "store"
    result = shardtrain("convert", imagefolder_src, dest, "--format", "lmdb", "--workers", "2",
                        "--shard-size", "50samples")
    assert result.exit_code == 0, result.stderr
    assert "layout: imagefolder (auto" in result.stderr and "added" in result.stderr
    info = json.loads(shardtrain("inspect", dest, "--json").stdout)
    manifest = read_manifest(str(dest))
    assert info["format"] == "lmdb" and info["version"] == 1 and info["classes"] == manifest.classes
    assert info["rejects"] == 0
    assert info["splits"]["train"] == {"samples": manifest.splits["train"].samples,
                                       "shards": len(manifest.splits["train"].shards),
                                       "bytes": manifest.splits["train"].bytes,
                                       "classes_per_shard": {"min": 6, "median": 6, "max": 6}}  # mixed, not sorted
    assert info["order"] == {"rule": "key-hash", "seed": 0, "since_version": 1}
    assert shardtrain("verify", dest, "--deep").exit_code == 0
    plain = shardtrain("inspect", dest)
    assert plain.exit_code == 0 and "train" in plain.stdout + plain.stderr

    assert_one_line_error(shardtrain("convert", imagefolder_src, dest, "--format", "lmdb"), 1, "--append")


def test_a_store_of_another_format_is_refused_at_once_with_or_without_append(imagefolder_src, tmp_path):
    """Before, a wds store given --format lmdb was first told to pass --append, which then refused the format."""
    dest = tmp_path / "store"
    assert shardtrain("convert", imagefolder_src, dest, "--workers", "1").exit_code == 0
    for append in ([], ["--append"]):
        result = shardtrain("convert", imagefolder_src, dest, "--format", "lmdb", *append)
        assert_one_line_error(result, 1)
        assert result.stderr.strip() == (f"error: {dest} holds a wds store, and lmdb shards cannot be written into "
                                         "it; give another DEST, or --format wds")
    assert read_manifest(str(dest)).format == "wds"


def test_console_script_missing_src_is_one_line(tmp_path):
    result = subprocess.run([SHARDTRAIN, "convert", str(tmp_path / "missing"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == f"error: source {tmp_path / 'missing'} does not exist"


def test_append_says_how_many_stored_samples_changed_and_how_to_take_the_changes(tmp_path):
    """The table counts a `changed` reject among the others; what happened to those samples and how to take
    their changes are said once more in a line of their own, counting only this run's `changed` rejects."""
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 4}, size=64)
    dest = tmp_path / "s"
    assert shardtrain("convert", src, dest, "--workers", "1").exit_code == 0
    labels = src / "labels" / "train"
    (labels / "img_0001.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # the user fixed a label
    (src / "images" / "train" / "new.jpg").write_bytes(b"")  # a new input, rejected as `empty`
    first = shardtrain("convert", src, dest, "--append", "--workers", "1")
    assert first.exit_code == 0, first.stderr
    assert ("1 stored sample changed in SRC and was kept as stored: to take the changes, convert the source into "
            "a new, empty DEST and train on that store") in first.stderr.splitlines()
    (labels / "img_0002.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (labels / "img_0003.txt").unlink()
    second = shardtrain("convert", src, dest, "--append", "--workers", "1")
    assert ("2 stored samples changed in SRC and were kept as stored: to take the changes, convert the source "
            "into a new, empty DEST and train on that store") in second.stderr.splitlines()
    again = shardtrain("convert", src, dest, "--append", "--workers", "1")  # no new reject: nothing to say
    assert again.exit_code == 0 and "changed in SRC" not in again.stderr


def test_errors_are_one_line_with_exit_codes(tmp_path):
    assert_one_line_error(shardtrain("convert", tmp_path / "missing", tmp_path / "out"), 1, "missing", "does not exist")
    assert_one_line_error(shardtrain("convert", tmp_path, tmp_path / "out", "--shard-size", "lots"), 2, "--shard-size")
    assert_one_line_error(shardtrain("verify", tmp_path / "nothing"), 1, "no shard store")
    assert shardtrain("convert", tmp_path, tmp_path / "out", "--format", "zip").exit_code == 2
    # before, "" converted the current folder
    assert_one_line_error(shardtrain("convert", "", tmp_path / "out"), 2, "SRC is empty (an unset shell variable?)")
    assert_one_line_error(shardtrain("convert", tmp_path, ""), 2, "DEST is empty")


def test_an_s3_store_without_credentials_says_which_variables_to_set(imagefolder_src, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached: the credentials are missing first
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses filesystems (and their credentials) in a process
    try:
        for args in (("convert", imagefolder_src, "s3://bucket/store"), ("inspect", "s3://bucket/store")):
            assert_one_line_error(shardtrain(*args), 1, "no S3 credentials: set AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # nor may the tests after this one get its credential-less one


def test_a_conversion_that_rejects_every_input_fails_and_inspect_shows_why(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea", "rocket"],
                                   flat=True)
    dest = tmp_path / "s"
    for append in ([], ["--append"], []):  # first, onto the store of rejects, the same command again
        result = shardtrain("convert", src, dest, "--max-pixels", "1000", "--workers", "1", *append)
        assert result.exit_code == 1 and "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"error: every input was rejected (4), so {dest} holds no sample: the reasons are in "
            f"{dest}/rejects.jsonl, counted by `shardtrain inspect {dest}`")
    assert len((dest / "rejects.jsonl").read_text().splitlines()) == 4
    info = shardtrain("inspect", dest, "--json")
    assert info.exit_code == 0, info.stderr
    assert (json.loads(info.stdout)["splits"], json.loads(info.stdout)["rejects_by_reason"]) == ({}, {"too_large": 4})
    plain = shardtrain("inspect", dest)
    assert plain.exit_code == 0, plain.stderr
    assert 'rejects: 4 {"too_large": 4}' in plain.stdout and "splits: none, no sample stored" in plain.stdout

    assert shardtrain("convert", src, tmp_path / "ok", "--workers", "1").exit_code == 0
    nothing_new = shardtrain("convert", src, tmp_path / "ok", "--workers", "1", "--append")
    assert nothing_new.exit_code == 0 and "error" not in nothing_new.stderr


def test_a_hand_edited_rejects_file_is_named_with_its_line(tmp_path):
    """Before, inspect said `error: JSONDecodeError: ...` or `ValidationError: 3 validation errors`, naming neither."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea"], flat=True)
    dest = tmp_path / "s"
    assert shardtrain("convert", src, dest, "--workers", "1").exit_code == 0
    (dest / "rejects.jsonl").write_text('\n{nope\n')
    assert_one_line_error(shardtrain("inspect", dest), 1, f"{dest / 'rejects.jsonl'} line 2 is not valid JSON")
    (dest / "rejects.jsonl").write_text('{"path": 3}\n')
    assert_one_line_error(shardtrain("inspect", dest), 1, f"{dest / 'rejects.jsonl'} line 1 is not a reject record: "
                                                          "path: Input should be a valid string")


def test_a_manifest_naming_a_shard_outside_the_store_is_refused(tmp_path):
    """A hand-edited shard name joined to the store's root would read, and verify, a file elsewhere."""
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea"], flat=True)
    dest = tmp_path / "s"
    assert shardtrain("convert", src, dest, "--workers", "1", "--val-fraction", "0").exit_code == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = "../../etc/passwd"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    for command in ("inspect", "verify"):
        assert_one_line_error(shardtrain(command, dest), 1, f"{dest / 'manifest.json'} is not a valid manifest: "
                              "splits.train.shards.0.name: Value error, a shard's name is a file name in the store's "
                              "folder, not '../../etc/passwd'")


@pytest.mark.parametrize("fmt", ["wds", "lmdb"])
def test_a_flipped_byte_is_caught(imagefolder_src, tmp_path, fmt):
    dest = tmp_path / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format=fmt, shard_size="40samples",
                           workers=1), progress=False)
    victim = read_manifest(str(dest)).splits["train"].shards[1].name
    data = bytearray((dest / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dest / victim).write_bytes(bytes(data))
    problems = verify(str(dest))
    assert problems and all(p.startswith(f"{victim}: ") for p in problems)
    if fmt == "wds":  # the CLI once is enough
        result = shardtrain("verify", dest)
        assert result.exit_code == 1 and victim in result.stderr and "sha256" in result.stderr


def test_verify_of_an_appended_store_missing_a_shard_ends_saying_how_to_recover(tmp_path):
    src = samples.make_imagefolder(tmp_path / "src", per_class={"train": 2}, size=32, classes=["chelsea", "rocket"],
                                   flat=True)
    dest = tmp_path / "s"
    convert(ConvertOptions(src=str(src), dest=str(dest), workers=1), progress=False)
    samples.make_imagefolder(src, per_class={"train": 1}, size=32, classes=["chelsea"], flat=True, start=100, seed=1)
    appended = convert(ConvertOptions(src=str(src), dest=str(dest), workers=1, append=True), progress=False)
    (dest / appended.shards_written[0]).unlink()
    result = shardtrain("verify", dest)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-2:] == [
        f"error: {appended.shards_written[0]}: missing",
        "to recover: put the files named above back from a copy of the store, or convert the source again into a "
        "new, empty DEST and point data.path at it (convert does not repair a store in place)"]
    # as it says: neither a rerun nor an --append rewrites the shard
    assert shardtrain("convert", src, dest, "--workers", "1").exit_code == 1
    assert shardtrain("convert", src, dest, "--workers", "1", "--append").exit_code == 0
    assert shardtrain("verify", dest).exit_code == 1


def test_deep_verify_decodes_every_image(imagefolder_src, tmp_path):
    """A shard whose bytes match the manifest but hold an undecodable image: only --deep sees it."""
    import hashlib
    import tarfile

    dest = tmp_path / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), shard_size="40samples", workers=1),
            progress=False)
    manifest = read_manifest(str(dest))
    entry = manifest.splits["val"].shards[0]
    path = dest / entry.name
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    data = bytearray(path.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = b"\0" * member.size
    path.write_bytes(bytes(data))
    entry.sha256 = hashlib.sha256(data).hexdigest()  # as if the shard had been written this way
    (dest / "manifest.json").write_text(manifest.model_dump_json())
    assert verify(str(dest)) == []
    problems = verify(str(dest), deep=True)
    key = member.name.partition(".")[0]
    assert len(problems) == 1 and problems[0].startswith(f"{entry.name}: sample {key}: jpg does not decode")


def test_val_fraction_shown_by_inspect_and_refused_with_split_folders(imagefolder_src, tmp_path):
    result = shardtrain("convert", imagefolder_src / "train", tmp_path / "s", "--val-fraction", "0.25")
    assert result.exit_code == 0, result.stderr
    assert "25% of the inputs held out as val" in result.stderr
    plain = shardtrain("inspect", tmp_path / "s")
    assert "holdout: 25.0% of the inputs in val (val when int.from_bytes(sha256(key)" in plain.stdout
    assert json.loads(shardtrain("inspect", tmp_path / "s", "--json").stdout)["holdout"]["fraction"] == 0.25
    assert_one_line_error(shardtrain("convert", imagefolder_src, tmp_path / "t", "--val-fraction", "0.1"), 1,
                          "--val-fraction 0.1", "already has split folders")
    assert_one_line_error(shardtrain("convert", imagefolder_src, tmp_path / "t", "--val-fraction", "1.5"), 2,
                          "--val-fraction")
