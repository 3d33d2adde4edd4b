"""`shardtrain predict` with a classifier: each image's top classes, as the run's own evaluation saw it."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from pipelines import AugmentConfig, detect_eval
from shards import ConvertOptions, convert
from tests.test_training_export import checkpoint_notes
from training import load_config, run
from training.config import TrainError
from training.predict import check_one_output_each, detect, list_images

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


@pytest.fixture(scope="module")
def trained(imagefolder_src, tmp_path_factory) -> tuple[Path, Path]:
    """A classifier trained a few epochs on the photos' train split: (its config, best.pt)."""
    tmp = tmp_path_factory.mktemp("predict")
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(tmp / "store")), progress=False)
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "t", "runs_dir": str(tmp / "runs"), "seed": 0,
        "data": {"path": str(tmp / "store"), "image_size": 32, "batch_size": 16, "workers": 0, "pin_memory": False,
                 "channels_last": False},
        "model": {"name": "test_resnet"},
        "optim": {"lr": 5e-3, "warmup_epochs": 1},
        "train": {"epochs": 3, "log_every": 5},
    }))
    run(load_config(config))
    return config, tmp / "runs" / "t" / "checkpoints" / "best.pt"


def predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SHARDTRAIN, "predict", *args], capture_output=True, text=True, timeout=300)


def test_top_classes_score_the_val_split_as_the_run_did(trained, imagefolder_src, tmp_path):
    config, best = trained
    val_loss, val_top1 = run_eval(best)
    assert val_top1 > 1 / 6 + 0.15, "the run learned too little for the comparison to mean anything"
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "pred"
    proc = predict(str(config), str(best), str(imagefolder_src / "val"), str(tmp_path / "broken.jpg"),
                   "--out", str(out), "--top", "6")
    assert proc.returncode == 1, proc.stderr[-2000:]  # the broken image is reported, the rest predicted
    assert "24 images -> " in proc.stdout and "1 unreadable" in proc.stdout and "boxes" not in proc.stdout
    records = json.loads((out / "predictions.json").read_text())
    read = [r for r in records if "error" not in r]
    assert len(read) == 24 and all(len(r["classes"]) == 6 for r in read)
    for r in read:
        scores = [c["score"] for c in r["classes"]]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-5)
    truth = [Path(r["image"]).parent.name for r in read]
    right = sum(r["classes"][0]["name"] == name for r, name in zip(read, truth))
    loss = sum(-math.log(next(c["score"] for c in r["classes"] if c["name"] == name))
               for r, name in zip(read, truth)) / 24
    print(f"predict: top-1 {right}/24, loss {loss:.5f}; the run's eval: val_top1 {val_top1:.4f}, loss {val_loss:.5f}")
    # the same images, transform, normalisation and weights as the run's evaluation: what it measured (one image
    # of slack for top-1, for a near tie that batch 1 and the eval batch round apart)
    assert loss == pytest.approx(val_loss, abs=2e-4)
    assert abs(right / 24 - val_top1) <= 1 / 24, (right, val_top1)


def run_eval(best: Path) -> tuple[float, float]:
    """The run's val_loss and val_top1 (a fraction) at best.pt's step."""
    step = torch.load(best, map_location="cpu", weights_only=True)["step"]
    with open(best.parents[1] / "results.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if int(r["step"]) == step)
    return float(row["val_loss"]), float(row["val_top1"]) / 100


def test_detect_only_options_and_other_tasks_are_one_line(trained, imagefolder_src, tmp_path):
    config, best = trained
    val = str(imagefolder_src / "val")

    def error(cfg: Path, *extra: str) -> str:
        result = CliRunner().invoke(app, ["predict", str(cfg), str(best), val, "--out", str(tmp_path), *extra])
        assert result.exit_code == 2, result.output
        return result.stderr.strip()

    for extra in (["--format", "yolo"], ["--draw"], ["--conf", "0.5"]):
        assert error(config, *extra) == ("error: --format yolo, --draw and --conf are for detect runs; a classify "
                                         "run writes each image's top classes to predictions.json (--top)")
    assert error(config, "--top", "0") == "error: --top must be at least 1, not 0"
    assert error(config, "--format", "xml") == "error: --format must be json or yolo, not xml"  # was the line above
    assert error(config, "--conf", "2") == "error: --conf is a score between 0 and 1, not 2.0"
    result = CliRunner().invoke(app, ["predict", str(config), str(best), val, "--out", str(tmp_path), "--top", "2"])
    assert result.exit_code == 0, result.output
    assert all(len(r["classes"]) == 2 for r in json.loads((tmp_path / "predictions.json").read_text()))
    dino = tmp_path / "dino.yaml"
    dino.write_text(config.read_text() + "task: dino\n")
    assert error(dino).startswith("error: predict needs a config with task: classify or detect, this one has "
                                  "task: dino")


def test_a_file_that_is_not_a_checkpoint_is_one_line(trained, imagefolder_src, tmp_path):
    """The marker beside best.pt, an image (arguments swapped), a pickled model, an empty file: each says what it
    is not, and never suggests weights_only=False (which would run whatever code the file holds)."""
    config, best = trained
    image = next((imagefolder_src / "val").rglob("*.jpg"))
    torch.save(timm.create_model("test_resnet"), tmp_path / "whole.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(best.read_bytes()[:4096])
    expected = "expected one written by `shardtrain train`, e.g. runs/NAME/checkpoints/best.pt"
    bad = {best.with_name("best.pt.complete"): f"is not a checkpoint file; {expected}",
           image: f"is not a checkpoint file; {expected}",
           tmp_path / "empty.pt": f"is not a checkpoint file; {expected}",
           tmp_path / "whole.pt": "holds pickled Python objects (a whole model saved with torch.save(model)?), not "
                                  f"only tensors; {expected}"}
    for path, what in bad.items():
        for command in (["predict", str(config), str(path), str(best)],  # predict's images: best.pt, as if swapped
                        ["export", str(config), str(path), "--out", str(tmp_path / "out")]):
            result = CliRunner().invoke(app, command)
            assert (result.exit_code, result.stderr) == (2, f"error: {path} {what}\n"), result.output
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # loads, but is no dict
    result = CliRunner().invoke(app, ["export", str(config), str(tmp_path / "tensor.pt")])
    assert (result.exit_code, result.stderr) == (2, f"error: checkpoint {tmp_path / 'tensor.pt'} has no class names: "
                                                    "is it a shardtrain checkpoint?\n"), result.output
    result = CliRunner().invoke(app, ["export", str(config), str(tmp_path / "truncated.pt")])
    assert result.exit_code == 2 and result.stderr.startswith(
        f"error: cannot read checkpoint {tmp_path / 'truncated.pt'}: PytorchStreamReader failed"), result.output
    assert len(result.stderr.splitlines()) == 1


def test_an_out_that_is_a_file_and_a_checkpoint_without_its_config_are_one_line(trained, imagefolder_src, tmp_path):
    """Before, FileExistsError and NotADirectoryError from mkdir, and AttributeError on a checkpoint whose config
    was None."""
    config, best = trained
    val = str(imagefolder_src / "val")
    (tmp_path / "file").write_text("not a folder")
    for command in (["predict", str(config), str(best), val], ["export", str(config), str(best)]):
        for out, what in ((tmp_path / "file", " is a file; give a folder"),
                          (tmp_path / "file" / "sub", ": a file stands in its path; give a folder")):
            result = CliRunner().invoke(app, [*command, "--out", str(out)])
            assert (result.exit_code, result.stderr) == (2, f"error: --out {out}{what}\n"), result.output
    ckpt = torch.load(best, weights_only=True)
    torch.save({**ckpt, "config": None}, tmp_path / "no_config.pt")
    result = CliRunner().invoke(app, ["export", str(config), str(tmp_path / "no_config.pt"), "--out",
                                      str(tmp_path / "out")])
    assert (result.exit_code, result.stderr) == (
        2, f"error: checkpoint {tmp_path / 'no_config.pt'} has no class names: is it a shardtrain checkpoint?\n")


def test_an_empty_image_file_is_reported_as_empty(trained, tmp_path):
    """Before, a 0-byte file was "not an image (starts with )"."""
    config, best = trained
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", str(config), str(best), str(empty), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert f"warning: skipped {empty}: cannot read it as an image: empty (0 bytes)" in result.stdout.splitlines()
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == [
        {"image": str(empty), "error": "cannot read: OSError: empty (0 bytes)"}]


def test_same_named_images_clash_only_where_each_writes_a_file(trained, imagefolder_src, tmp_path):
    """predictions.json names each image by its path: photo.jpg and photo.png, or a/img.jpg and b/img.jpg, are
    two records. Only --draw and --format yolo write a file per image, named by its stem."""
    config, best = trained
    jpg = next((imagefolder_src / "val").rglob("*.jpg"))
    (tmp_path / "folder").mkdir()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "img.jpg").write_bytes(jpg.read_bytes())
    (tmp_path / "folder" / "photo.jpg").write_bytes(jpg.read_bytes())
    Image.open(jpg).save(tmp_path / "folder" / "photo.png")
    inputs = [tmp_path / "folder", tmp_path / "a" / "img.jpg", tmp_path / "b" / "img.jpg"]
    result = CliRunner().invoke(app, ["predict", str(config), str(best), *map(str, inputs), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "out" / "predictions.json").read_text())) == 4
    with pytest.raises(TrainError) as e:
        check_one_output_each(list_images(inputs))
    assert str(e.value) == (f"{tmp_path / 'folder' / 'photo.jpg'} and {tmp_path / 'folder' / 'photo.png'} would "
                            "write the same output file photo; predict them in separate runs")
    a_and_b = f"{tmp_path / 'a' / 'img.jpg'} and {tmp_path / 'b' / 'img.jpg'} would"
    with pytest.raises(TrainError, match="^" + re.escape(a_and_b)):
        check_one_output_each(list_images(inputs[1:]))


def test_a_folder_is_read_as_convert_reads_a_source_and_what_it_leaves_out_is_named(trained, imagefolder_src,
                                                                                     tmp_path):
    """Before, predict's own extension list left out GIF, PPM and .jfif files that convert takes, and its
    rglob left out symlinked folders, without a word."""
    config, best = trained
    jpg = next((imagefolder_src / "val").rglob("*.jpg"))
    folder = tmp_path / "new"
    (folder / "phone").mkdir(parents=True)
    for name in ("a.gif", "b.ppm", "c.JFIF"):
        Image.open(jpg).save(folder / name, format={"gif": "GIF", "ppm": "PPM", "jfif": "JPEG"}[name[2:].lower()])
    (folder / "phone" / "d.jpg").write_bytes(jpg.read_bytes())
    (folder / "phone" / "._d.jpg").write_bytes(b"\0" * 64)
    (folder / "linked").symlink_to(folder / "phone", target_is_directory=True)
    result = CliRunner().invoke(app, ["predict", str(config), str(best), str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(Path(r["image"]).relative_to(folder).as_posix() for r in records) == [
        "a.gif", "b.ppm", "c.JFIF", "linked/d.jpg", "phone/d.jpg"]
    assert all("classes" in r for r in records), records
    assert (f"warning: skipped {folder}/linked/._d.jpg and 1 more: hidden files (a name starting with '.', as "
            "macOS's ._ copies), not read; rename them to convert them") in result.stdout.splitlines()


def test_the_checkpoints_model_and_input_settings_overrule_the_configs(trained, imagefolder_src, tmp_path):
    """A config that differs from the run's in what defines the model and its input (a training override left
    out, another eval crop, another model name, EMA weights the run did not keep) is overruled by the config the
    checkpoint stores, with one line per setting: predict gives the run's own predictions, export the run's input
    size."""
    config, best = trained
    raw = yaml.safe_load(config.read_text())
    raw["data"] |= {"image_size": 64, "augment": {"eval_crop_pct": 1.0}}
    raw["model"]["name"] = "resnet18"
    raw |= {"train": {**raw["train"], "ema_decay": 0.9}, "eval": {"metric": "ema_val_top1"}}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    notes = ["using the checkpoint's data.augment.eval_crop_pct=0.875 (the config says 1.0)",
             "using the checkpoint's data.image_size=32 (the config says 64)",
             "using the checkpoint's eval.metric=val_top1 (the config says ema_val_top1)",
             "using the checkpoint's model.name=test_resnet (the config says resnet18)",
             "using the checkpoint's train.ema_decay=null (the config says 0.9)"]

    val = imagefolder_src / "val"
    assert checkpoint_notes("predict", config, best, val, "--out", tmp_path / "own") == []
    assert checkpoint_notes("predict", other, best, val, "--out", tmp_path / "other") == notes
    assert (tmp_path / "other" / "predictions.json").read_text() == (tmp_path / "own" / "predictions.json").read_text()
    assert checkpoint_notes("export", other, best, "--out", tmp_path / "onnx", "--format", "onnx") == notes
    info = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert info["architecture"] == "test_resnet"
    assert (info["pretrained_cfg"]["input_size"], info["pretrained_cfg"]["crop_pct"]) == ([3, 32, 32], 0.875)
    assert ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx")).get_inputs()[0].shape == ["batch", 3, 32, 32]


class FixedDetections(torch.nn.Module):
    """Stands in for a detector: the same boxes (letterboxed pixels), scores and labels for any image."""

    def __init__(self, boxes: list[list[float]]):
        super().__init__()
        self.boxes = torch.tensor(boxes)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        n = len(self.boxes)
        return [{"boxes": self.boxes, "scores": torch.full((n,), 0.9), "labels": torch.arange(n)} for _ in images]


def test_a_box_in_the_letterbox_padding_is_no_box_of_the_image():
    # a 64x32 photo letterboxed to 64x64: rows 0-15 and 48-63 are padding. Before, the first box came out of
    # `predict --format yolo` as a line of height 0 on the photo's top edge.
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    model = FixedDetections([[8, 2, 20, 12], [8, 20, 30, 40], [10, 10, 30, 20]])
    det = detect(model, image, detect_eval(64, AugmentConfig()), torch.zeros(3, 1, 1), torch.ones(3, 1, 1), conf=0.5)
    assert det["labels"].tolist() == [1, 2]
    assert det["boxes"].tolist() == [[8, 4, 30, 24], [10, 0, 30, 4]]  # the last one cut at the edge, kept
