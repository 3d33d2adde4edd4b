"""Real DINO runs: the baseline through `shardtrain train` (torchrun, gloo on CPU), a tiny ViT on an unlabeled
store, k-NN evaluated on a labeled one; a run killed with kill -9 and resumed ends with exactly its weights
(student, teacher and center) and optimizer state. Helpers are the classification run tests'."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows.cli import app
from shards import ConvertOptions, convert
from tests.test_training_runs import finish, kill_group, start, train, wait_for
from training import TrainError, launch, load_config
from training.preflight import preflight

STEPS = 8  # 32 unlabeled images / batch 8 = 4 steps an epoch, 2 epochs


@pytest.fixture(scope="module")
def stores(imagefolder_src, unlabeled_src, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("dino-stores")
    for src, dest in ((unlabeled_src, root / "unlabeled"), (imagefolder_src, root / "labeled")):
        convert(ConvertOptions(src=str(src), dest=str(dest), format="wds"), progress=False)
    return str(root / "unlabeled"), str(root / "labeled")


def write_config(path: Path, stores: tuple[str, str]) -> Path:
    unlabeled, labeled = stores
    cfg = {
        "name": "t", "runs_dir": str(path.parent / "runs"), "task": "dino", "seed": 5,
        "data": {"path": unlabeled, "image_size": 32, "batch_size": 8, "workers": 0, "pin_memory": False,
                 "channels_last": False, "augment": {"local_crops": 2, "local_size": 16}},
        "model": {"name": "vit_tiny_patch16_224",
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "dynamic_img_size": True}},
        "optim": {"lr": 2e-3, "weight_decay": 0.04, "warmup_epochs": 0.5, "clip_grad": 3.0},
        "train": {"epochs": 2, "log_every": 2, "deterministic": True},
        "checkpoint": {"every_steps": 2, "keep": 2},
        "eval": {"knn_path": labeled, "knn_k": 10},
        "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 1,
                 "teacher_temp": 0.07, "koleo_weight": 0.1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def last_checkpoint(runs: Path) -> dict:
    return torch.load(runs / "t" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def baseline(stores, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dino-baseline")
    train(write_config(tmp / "run.yaml", stores))
    return tmp / "runs"


def test_dino_run_trains_the_student_and_its_teacher(baseline):
    with open(baseline / "t" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8]  # one k-NN eval an epoch
    losses = [float(r["train_loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) == 2
    assert all(0 <= float(r["val_knn_top1"]) <= 100 for r in rows)
    assert list((baseline / "t" / "tb").glob("events.out.tfevents.*"))

    ckpt = last_checkpoint(baseline)
    assert ckpt["step"] == STEPS
    model = ckpt["model"]
    student = {k.removeprefix("student."): v for k, v in model.items() if k.startswith("student.")}
    teacher = {k.removeprefix("teacher.module."): v for k, v in model.items() if k.startswith("teacher.module.")}
    assert student.keys() == teacher.keys()
    assert not torch.equal(student["backbone.cls_token"], teacher["backbone.cls_token"])
    assert model["center"].abs().sum() > 0
    best = json.loads((baseline / "t" / "checkpoints" / "best.pt.complete").read_text())
    assert best["val_knn_top1"] == max(float(r["val_knn_top1"]) for r in rows)


def test_a_dino_checkpoint_as_a_classifier_s_weights_is_refused_until_exported(stores, baseline, tmp_path):
    # before, its student/teacher/centre tensors matched none of the model's: it trained from random init
    checkpoint = baseline / "t" / "checkpoints" / "last.pt"
    classify = yaml.safe_load(write_config(tmp_path / "dino.yaml", stores).read_text())
    classify.update(task="classify", runs_dir=str(tmp_path / "runs"))
    classify["data"].update(path=stores[1], augment={})
    del classify["dino"], classify["eval"]
    classify["model"]["pretrained"] = str(checkpoint)
    (tmp_path / "classify.yaml").write_text(yaml.safe_dump(classify))
    with pytest.raises(TrainError) as err:
        launch(tmp_path / "classify.yaml")
    assert str(err.value) == (
        f"model.pretrained: {checkpoint} is a DINO checkpoint (student, teacher and centre): export its teacher's "
        "backbone with `shardtrain export CONFIG CHECKPOINT --out DIR` and set model.pretrained to "
        "DIR/model.safetensors")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "dino.yaml"), str(checkpoint), "--out",
                                      str(tmp_path / "serve")])
    assert result.exit_code == 0, result.output
    preflight(load_config(tmp_path / "classify.yaml", [f"model.pretrained={tmp_path / 'serve' / 'model.safetensors'}"]))


def test_kill9_then_resume_is_exact(stores, baseline, tmp_path):
    """Killed after the checkpoint of a random step (in the first epoch's frozen prototypes, or later),
    resumed with resume: auto, the run ends with exactly the uninterrupted model, teacher, center and optimizer."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "run.yaml", stores)
    step = random.choice([2, 6])
    print(f"killing after the checkpoint of step {step}")
    # The worker alone (one process: torchrun adds nothing the resume depends on, and costs a launch each)
    proc = start(config, torchrun=False)
    wait_for(runs / "t" / "checkpoints" / f"step_{step:08d}.pt.complete", proc)
    kill_group(proc)

    code, out = finish(start(config, torchrun=False))
    assert code == 0, out[-3000:]
    assert "resumed from" in out
    a, b = last_checkpoint(baseline), last_checkpoint(runs)
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"optimizer {key} differs after resume"
    assert [g["weight_decay"] for g in a["optimizer"]["param_groups"]] == \
        [g["weight_decay"] for g in b["optimizer"]["param_groups"]]


def test_dino_run_with_gpu_decode_trains_as_the_cpu_decode_does(stores, baseline, tmp_path):
    """data.decode: gpu (on the CPU here: the same code without nvJPEG), views cropped and coloured in the
    training process from workers' crop boxes and colour parameters: the run ends with finite losses, a k-NN
    eval each epoch and a teacher that moved, as the cpu mode's run does."""
    config = write_config(tmp_path / "run.yaml", stores)
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(decode="gpu", workers=2)
    config.write_text(yaml.safe_dump(raw))
    out = train(config, torchrun=False)
    assert "data.decode: gpu (set in the config)" in out
    with open(tmp_path / "runs" / "t" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    with open(baseline / "t" / "results.csv") as f:
        cpu_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [int(r["step"]) for r in cpu_rows] == [4, 8]
    losses = [float(r["train_loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) == 2
    # the same data, augmented alike: the loss is of the cpu run's size (not the same draws, so not equal)
    assert all(abs(a - float(b["train_loss"])) < 0.5 * float(b["train_loss"]) for a, b in zip(losses, cpu_rows))
    model = last_checkpoint(tmp_path / "runs")["model"]
    assert not torch.equal(model["student.backbone.cls_token"], model["teacher.module.backbone.cls_token"])
