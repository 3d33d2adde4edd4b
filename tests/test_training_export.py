"""`shardtrain export`: safetensors that timm loads, ONNX that onnxruntime runs to torch's outputs, on real photos.

Checkpoints are written as the trainer writes them (model, classes, config) from freshly built models;
what is tested is that the exported model computes what the checkpoint's model computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from typer.testing import CliRunner

from flows.cli import app
from pipelines import decode_image, detect_eval
from pipelines.presets import classify_eval
from shards import ConvertOptions, convert, samples
from tests.test_detect_train import write_config
from training import checkpoint, load_config, run
from training.config import RunConfig, to_dict, validate
from training.export import lookup
from training.model import build_model
from training.predict import letterbox
from training.tasks.detect import build_detector
from training.tasks.dino import DinoHead, DinoModel, Encoder

SIZE = 64
CLASSES = samples.class_names()


def config(tmp_path: Path, **raw) -> tuple[RunConfig, Path]:
    cfg = {"name": "t", "runs_dir": str(tmp_path / "runs"), "data": {"path": "unused", "image_size": SIZE},
           "model": {"name": "test_resnet"}, **raw}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    return validate(cfg), path


def save(cfg: RunConfig, model: torch.nn.Module, classes: list[str], stored: dict | None = None) -> Path:
    """A checkpoint as the trainer writes it; `stored`: the config it holds where not `cfg`'s (an older version's)."""
    return checkpoint.save(Path(cfg.runs_dir) / cfg.name / "checkpoints",
                           {"model": model.state_dict(), "ema": None, "step": 3, "epoch": 1,
                            "config": to_dict(cfg) if stored is None else stored, "classes": classes}, keep=2)


def shardtrain_export(config_path: Path, ckpt: Path, out: Path, fmt: str) -> None:
    result = CliRunner().invoke(app, ["export", str(config_path), str(ckpt), "--out", str(out), "--format", fmt])
    assert result.exit_code == 0, result.output


def checkpoint_notes(*args: str | Path) -> list[str]:
    """Run the CLI, which must succeed; its lines on the settings it took from the checkpoint."""
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.splitlines() if line.startswith("using the checkpoint's")]


def photo_batch(cfg: RunConfig) -> torch.Tensor:
    """The bundled photos through the eval preset and normalisation, as training evaluates them."""
    aug, transform = cfg.data.augment, classify_eval(SIZE, cfg.data.augment)
    images = [transform(image=decode_image(p.read_bytes()))["image"] for p in samples.photo_paths()]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(aug.mean).view(1, 3, 1, 1)) / torch.tensor(aug.std).view(1, 3, 1, 1)


@pytest.fixture
def classifier(tmp_path):
    cfg, path = config(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CLASSES), tmp_path).eval()
    return cfg, path, model, save(cfg, model, CLASSES)


def test_safetensors_loads_in_timm_with_class_names_and_preprocessing(classifier, tmp_path):
    cfg, path, model, ckpt = classifier
    shardtrain_export(path, ckpt, tmp_path / "out", "safetensors")
    info = json.loads((tmp_path / "out" / "config.json").read_text())
    assert info["label_names"] == CLASSES and info["num_classes"] == len(CLASSES)
    loaded = timm.create_model("test_resnet", pretrained=True, pretrained_cfg_overlay={
        **info["pretrained_cfg"], "file": str(tmp_path / "out" / "model.safetensors")}).eval()
    data = timm.data.resolve_data_config({}, model=loaded)
    assert (tuple(data["input_size"]), data["crop_pct"]) == ((3, SIZE, SIZE), cfg.data.augment.eval_crop_pct)
    assert (tuple(data["mean"]), tuple(data["std"])) == (cfg.data.augment.mean, cfg.data.augment.std)
    x = photo_batch(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_onnx_classifier_matches_torch_on_real_photos(classifier, tmp_path):
    cfg, path, model, ckpt = classifier
    shardtrain_export(path, ckpt, tmp_path / "out", "onnx")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["label_names"] == CLASSES
    x = photo_batch(cfg)
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    [logits] = session.run(None, {"image": x.numpy()})  # a batch of 8: the batch axis is dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_onnx_detector_matches_torch_on_real_images(yolo_src, tmp_path):
    cfg, path = config(tmp_path, task="detect", detect={"fpn_channels": 64, "score_thresh": 0.2})
    torch.manual_seed(0)
    detector = build_detector(cfg, len(CLASSES), tmp_path).eval()
    # Freshly initialised FCOS scores every location at its 0.01 prior; spread the class logits so the
    # detections differ clearly in score (their order is then no coin toss between the two runtimes).
    torch.nn.init.normal_(detector.head.classification_head.cls_logits.weight, std=0.3)
    ckpt = save(cfg, detector, CLASSES)
    shardtrain_export(path, ckpt, tmp_path / "out", "onnx")
    info = json.loads((tmp_path / "out" / "config.json").read_text())
    assert info["label_names"] == CLASSES and info["input"]["shape"] == [1, 3, SIZE, SIZE]

    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    aug, transform = cfg.data.augment, detect_eval(SIZE, cfg.data.augment)
    mean, std = torch.tensor(aug.mean).view(3, 1, 1), torch.tensor(aug.std).view(3, 1, 1)
    found = 0
    for image_path in sorted((yolo_src / "images" / "val").glob("*.jpg")):
        boxed, _ = letterbox(transform, decode_image(image_path.read_bytes()))
        x = (torch.from_numpy(boxed).permute(2, 0, 1).float() / 255 - mean) / std
        boxes, scores, labels = session.run(None, {"image": x[None].numpy()})
        with torch.no_grad():
            expected = detector([x])[0]
        assert len(scores) == len(expected["scores"])
        np.testing.assert_allclose(scores, expected["scores"].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(boxes, expected["boxes"].numpy(), rtol=1e-4, atol=1e-3)
        assert (labels == expected["labels"].numpy()).all()
        found += len(scores)
    assert found > 0  # the comparison covered real detections


def test_dino_safetensors_is_the_teacher_backbone(tmp_path):
    cfg, path = config(tmp_path, task="dino", dino={"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8})
    backbone = build_model(cfg.model, 0, tmp_path)
    model = DinoModel(Encoder(backbone, DinoHead(backbone.num_features, 32, 16, 8, 3, True)), 32, 2)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)  # the student has moved on; the export must be the teacher
    shardtrain_export(path, save(cfg, model, []), tmp_path / "out", "safetensors")
    info = json.loads((tmp_path / "out" / "config.json").read_text())
    loaded = timm.create_model("test_resnet", pretrained=True, pretrained_cfg_overlay={
        **info["pretrained_cfg"], "file": str(tmp_path / "out" / "model.safetensors")})
    teacher = model.teacher.module.backbone.state_dict()
    assert loaded.num_classes == 0 and all(torch.equal(v, teacher[k]) for k, v in loaded.state_dict().items())


def test_the_format_defaults_to_the_tasks_and_one_it_has_not_is_one_line(tmp_path):
    cfg, path = config(tmp_path, task="detect", detect={"fpn_channels": 64})
    ckpt = save(cfg, build_detector(cfg, len(CLASSES), tmp_path), CLASSES)
    result = CliRunner().invoke(app, ["export", str(path), str(ckpt), "--out", str(tmp_path / "o"),
                                      "--format", "safetensors"])
    assert result.exit_code == 2 and result.stderr.strip() == "error: task detect exports as onnx, not safetensors"
    result = CliRunner().invoke(app, ["export", str(path), str(ckpt), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0 and (tmp_path / "o" / "model.onnx").is_file(), result.stderr


def test_a_checkpoint_of_another_model_than_the_configs_is_one_line(tmp_path):
    """The config names the model to build; a checkpoint of another run's says whose it is, not which of its
    hundreds of keys are missing."""
    (tmp_path / "dino").mkdir()
    dino_cfg, _ = config(tmp_path / "dino", task="dino", dino={"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8})
    backbone = build_model(dino_cfg.model, 0, tmp_path)
    ckpt = save(dino_cfg, DinoModel(Encoder(backbone, DinoHead(backbone.num_features, 32, 16, 8, 3, True)), 32, 2), [])
    _, path = config(tmp_path, task="detect", detect={"fpn_channels": 64})
    result = CliRunner().invoke(app, ["export", str(path), str(ckpt), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: checkpoint {ckpt} holds another model than the config's (task 'dino', this config has 'detect'): "
        "give the config it was trained with (its run dir's config.yaml)")


def test_a_trained_detector_keeps_its_size_and_architecture_whatever_the_config_says(yolo_src, tmp_path):
    """Trained at 64 px with 64 FPN channels; given a config of 96 px and 128 channels, predict and export use the
    checkpoint's (one line each), and what is chosen per invocation (the thresholds) stays the config's."""
    store = str(tmp_path / "store")
    convert(ConvertOptions(src=str(yolo_src), dest=store), progress=False)
    thresholds = {"score_thresh": 0.0}  # every candidate: the comparison below covers many boxes
    config = write_config(tmp_path / "run.yaml", store, train={"epochs": 1}, detect=thresholds)
    run(load_config(config))
    best = tmp_path / "runs" / "t" / "checkpoints" / "best.pt"
    other = write_config(tmp_path / "other" / "run.yaml", store, data={"image_size": 96},
                         detect={**thresholds, "fpn_channels": 128, "predict_score_thresh": 0.5})
    notes = ["using the checkpoint's data.image_size=64 (the config says 96)",
             "using the checkpoint's detect.fpn_channels=64 (the config says 128)"]

    images = yolo_src / "images" / "val"
    assert checkpoint_notes("predict", config, best, images, "--out", tmp_path / "own", "--conf", "0") == []
    assert checkpoint_notes("predict", other, best, images, "--out", tmp_path / "other", "--conf", "0") == notes
    own = json.loads((tmp_path / "own" / "predictions.json").read_text())
    assert sum(len(r["detections"]) for r in own) > 100
    assert json.loads((tmp_path / "other" / "predictions.json").read_text()) == own
    assert checkpoint_notes("export", other, best, "--out", tmp_path / "onnx") == notes
    info = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert info["input"]["shape"] == [1, 3, 64, 64] and info["thresholds"]["suggested_score"] == 0.5
    assert ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx")).get_inputs()[0].shape == [1, 3, 64, 64]


def test_the_checkpoints_settings_are_written_as_in_the_config(tmp_path):
    """The lines on what the checkpoint overrules spell both values as the YAML config and a key=value override
    do (null, true, [2, 3, 4]), not as Python (None, True)."""
    cfg, _ = config(tmp_path, task="detect", detect={"fpn_channels": 64})
    ckpt = save(cfg, build_detector(cfg, len(CLASSES), tmp_path), CLASSES)
    _, other = config(tmp_path, task="detect", data={"path": "unused", "image_size": SIZE,
                                                     "augment": {"mean": [0.5, 0.5, 0.5]}},
                      train={"ema_decay": 0.9}, detect={"fpn_channels": 64, "out_indices": [3, 4], "p6p7": False})
    assert checkpoint_notes("export", other, ckpt, "--out", tmp_path / "o") == [
        "using the checkpoint's data.augment.mean=[0.485, 0.456, 0.406] (the config says [0.5, 0.5, 0.5])",
        "using the checkpoint's detect.out_indices=[2, 3, 4] (the config says [3, 4])",
        "using the checkpoint's detect.p6p7=true (the config says false)",
        "using the checkpoint's train.ema_decay=null (the config says 0.9)"]


def test_a_checkpoint_setting_this_version_refuses_is_one_line_naming_it(classifier, tmp_path):
    """An older run's checkpoint may hold a value this version's config refuses (one now out of range, a metric
    since renamed). predict and export take it from the checkpoint whatever the config says, so the error names
    the checkpoint's setting, not the config's, and what can be done."""
    cfg, path, model, _ = classifier
    image = str(samples.photo_paths()[0])
    refused = [  # (the stored config's values, the setting named, why it is refused)
        ({"data.augment.std": [0.2, 0.0, 0.2]}, "data.augment.std=[0.2, 0.0, 0.2]", "Input should be greater than 0"),
        # data.image_size=48 is taken from the checkpoint as well, and valid: not named
        ({"data.image_size": 48, "eval.metric": "val_acc1"}, "eval.metric=val_acc1",
         "eval.metric: task classify reports val_top1, val_top5, ema_val_top1, ema_val_top5, not val_acc1"),
    ]
    for values, setting, why in refused:
        stored = to_dict(cfg)
        for key, value in values.items():
            section, leaf = key.rsplit(".", 1)
            lookup(stored, section)[leaf] = value
        ckpt = save(cfg, model, CLASSES, stored)
        for command in (["export", path, ckpt, "--out", tmp_path / "o"],
                        ["predict", path, ckpt, image, "--out", tmp_path / "p"]):
            result = CliRunner().invoke(app, list(map(str, command)))
            assert (result.exit_code, result.stderr) == (2, (
                f"error: checkpoint {ckpt} was trained with {setting}, which this version's config refuses ({why}); "
                "predict and export take the model's settings from the checkpoint whatever the config says: "
                "retrain, or use the shardtrain version that trained it\n")), result.output
