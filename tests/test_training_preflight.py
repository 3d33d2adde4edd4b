"""Early config checks: `launch` refuses these mistakes before torchrun starts, with one line, leaving
no run dir behind. Each case goes through `training.launch` in this process (what `shardtrain train` and
the train flow call); one also through the console script, for its exit code and stderr."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from shards import ConvertOptions, convert, samples
from training import TrainError, checkpoint, launch, load_config, run_dir
from training.config import to_dict
from training.model import build_model
from training.preflight import preflight

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))


@pytest.fixture(scope="module")
def stores(imagefolder_src, unlabeled_src, tmp_path_factory) -> dict[str, str]:
    """A store with train and val splits; ones of a flat source converted with --val-fraction 0 and with the
    default holdout; one of unlabeled photos."""
    root = tmp_path_factory.mktemp("preflight")
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(root / "both")), progress=False)
    convert(ConvertOptions(src=str(imagefolder_src / "train"), dest=str(root / "train-only"), val_fraction=0),
            progress=False)
    convert(ConvertOptions(src=str(imagefolder_src / "train"), dest=str(root / "held-out")), progress=False)
    convert(ConvertOptions(src=str(unlabeled_src), dest=str(root / "unlabeled")), progress=False)
    return {name: str(root / name) for name in ("both", "train-only", "held-out", "unlabeled")}


def write(tmp_path: Path, store: str, **model) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "runs_dir": str(tmp_path / "runs"),
        "data": {"path": store, "image_size": 32, "batch_size": 8, "workers": 0},
        "model": {"name": "test_resnet", **model},
    }))
    return path


def refused(config: Path, *overrides: str) -> str:
    """launch's one-line error; the run dir must not exist afterwards (unless it did before)."""
    existed = run_dir(load_config(config, overrides)).exists()
    started = time.perf_counter()
    with pytest.raises(TrainError) as err:
        launch(config, overrides)
    print(f"refused in {time.perf_counter() - started:.2f}s: {err.value}")
    assert "\n" not in str(err.value)
    assert run_dir(load_config(config, overrides)).exists() == existed
    return str(err.value)


def test_missing_store(tmp_path):
    message = refused(write(tmp_path, str(tmp_path / "nostore")))
    assert message == f"data.path: no shard store at {tmp_path / 'nostore'} (no manifest.json)"


def test_split_the_store_lacks(stores, tmp_path):
    message = refused(write(tmp_path, stores["train-only"]))
    assert message.startswith(f"data.path: the store {stores['train-only']} has no split 'val' (it has: train); ")
    assert "--val-fraction 0" in message
    assert refused(write(tmp_path, stores["both"]), "data.train_split=test").startswith(
        f"data.path: the store {stores['both']} has no split 'test' (it has: train, val)")


def test_a_misspelt_split_of_a_held_out_store_is_not_blamed_on_the_holdout(stores, tmp_path):
    message = refused(write(tmp_path, stores["held-out"]), "data.train_split=trian")
    assert message.startswith(f"data.path: the store {stores['held-out']} has no split 'trian' (it has: train, val); "
                              "set data.train_split to one of those")
    assert "holdout" not in message


def test_a_store_of_another_layout_is_named_before_its_splits(stores, tmp_path):
    # an unlabeled store has no val split either: the split's advice (--val-fraction) would not help
    assert refused(write(tmp_path, stores["unlabeled"])) == (
        f"data.path: {stores['unlabeled']}: task classify needs a store of layout imagefolder, this one is 'unlabeled'")


def test_a_vit_built_for_another_input_size_names_the_setting(stores, tmp_path):
    # it stopped at the first step instead, with timm's assertion from every rank
    config = write(tmp_path, stores["both"], name="vit_tiny_patch16_224")
    assert refused(config) == ("model.kwargs: vit_tiny_patch16_224 takes 224x224 inputs and data.image_size is 32: "
                               "add img_size: 32 (timm resizes pretrained position embeddings to it)")
    preflight(load_config(config, ["model.kwargs={img_size: 32}"]))  # the named fix passes
    dino = ["task=dino", f"data.path={stores['unlabeled']}", "model.kwargs={img_size: 32}",
            "data.augment.local_crops=2", "data.augment.local_size=16", f"eval.knn_path={stores['both']}"]
    assert refused(config, *dino) == ("model.kwargs: vit_tiny_patch16_224 takes one input size; add "
                                      "dynamic_img_size: true so DINO's 32px global and 16px local crops pass")
    preflight(load_config(config, [*dino[:2], "model.kwargs={dynamic_img_size: true}", *dino[3:]]))


def test_a_detection_split_without_boxes_is_refused_before_it_trains(tmp_path):
    # before, val_map was COCO's -1 at every eval, and best.pt kept the first epoch's weights
    src = samples.make_yolo(tmp_path / "src", per_split={"train": 6, "val": 3}, size=64)
    shutil.rmtree(src / "labels" / "val")
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "s"), workers=1), progress=False)
    config = write(tmp_path, str(tmp_path / "s"))
    store = str(tmp_path / "s")
    assert refused(config, "task=detect") == (
        f"data.path: the val split of {store} holds no boxes (none of its 3 images has a label line), so val_map "
        "cannot be measured on it (COCO mAP is undefined without boxes); label them and convert into an empty "
        "store, or set data.val_split to a split with boxes")
    assert refused(config, "task=detect", "data.train_split=val", "data.val_split=train").startswith(
        f"data.path: the val split of {store} holds no boxes (none of its 3 images has a label line), so the "
        "detector would learn background alone; ")
    preflight(load_config(config, ["task=detect", "data.val_split=train"]))  # a split with boxes passes


def test_a_pretrained_file_timm_would_not_load_is_one_line_before_torchrun(stores, tmp_path):
    # before, another model's weights trained from random init (one line of timm's log), and a file of another
    # kind was a traceback from every rank
    import safetensors.torch
    import timm

    config = write(tmp_path, stores["both"])
    weights = tmp_path / "w"
    weights.mkdir()
    torch.save(timm.create_model("test_vit").state_dict(), weights / "vit.pth")
    safetensors.torch.save_file(timm.create_model("test_vit").state_dict(), weights / "vit.safetensors")
    for name in ("vit.pth", "vit.safetensors"):
        message = refused(config, f"model.pretrained={weights / name}")
        assert message.startswith("model.pretrained: none of the ") and "tensors in" in message
        assert "are they another model's weights?" in message
    (weights / "notes.pth").write_text("the weights are on the other disk")
    assert refused(config, f"model.pretrained={weights / 'notes.pth'}").startswith(
        f"model.pretrained: {weights / 'notes.pth'} is not a weights file torch or safetensors reads (")
    assert refused(config, f"model.pretrained={weights}") == (
        f"model.pretrained: {weights} is a folder; give the weights file in it")
    # the model's own weights pass, from a file or a checkpoint dict, whatever their head (10 classes here)
    torch.save({"state_dict": timm.create_model("test_resnet", num_classes=10).state_dict()}, weights / "rn.pth")
    preflight(load_config(config, [f"model.pretrained={weights / 'rn.pth'}"]))


def test_dino_without_a_labeled_store_for_its_knn_eval_is_one_line_before_torchrun(stores, tmp_path):
    # before, it stopped after the workers' start-up, leaving a run dir; and an unlabeled eval.knn_path was first
    # blamed on its missing val split, whose fix then met this refusal
    dino = ["task=dino", f"data.path={stores['unlabeled']}", "model.name=vit_tiny_patch16_224",
            "model.kwargs={img_size: 32, dynamic_img_size: true}", "data.augment.local_crops=2",
            "data.augment.local_size=16"]
    config = write(tmp_path, stores["both"])
    assert refused(config, *dino) == (
        "data.path (no eval.knn_path set): the k-NN evaluation of task dino needs a labeled (imagefolder) store, "
        f"{stores['unlabeled']} has layout unlabeled; set eval.knn_path to one")
    assert refused(config, *dino, f"eval.knn_path={stores['unlabeled']}") == (
        "eval.knn_path: the k-NN evaluation of task dino needs a labeled (imagefolder) store, "
        f"{stores['unlabeled']} has layout unlabeled; set eval.knn_path to one")
    preflight(load_config(config, [*dino, f"eval.knn_path={stores['both']}"]))


def test_model_name_timm_does_not_know(stores, tmp_path):
    assert refused(write(tmp_path, stores["both"], name="resnet_nope")).startswith(
        "bad value for model.name: no timm model named 'resnet_nope'")
    assert refused(write(tmp_path, stores["both"], name="resnet18.not_a_tag")).startswith(
        "bad value for model.name: timm's resnet18 has no pretrained tag 'not_a_tag' (it has: ")


def resnet18_checkpoint(tmp_path: Path, store: str) -> tuple[Path, Path]:
    """A resnet18 run's checkpoint in the run dir of `write`'s config; returns (checkpoint, run dir)."""
    other = load_config(write(tmp_path, store, name="resnet18"))
    model = build_model(other.model, num_classes=6, cache_dir=tmp_path)
    ckpt = checkpoint.save(run_dir(other) / "checkpoints",
                           {"model": model.state_dict(), "step": 4, "epoch": 1, "config": to_dict(other),
                            "classes": [f"c{i}" for i in range(6)]}, keep=2)
    return ckpt, run_dir(other)


def test_run_dir_whose_checkpoint_holds_another_model(stores, tmp_path):
    """The run dir holds a resnet18 run's checkpoint; this config names test_resnet."""
    ckpt, rdir = resnet18_checkpoint(tmp_path, stores["both"])
    before = sorted(p.name for p in rdir.rglob("*"))
    message = refused(write(tmp_path, stores["both"]))
    assert message.startswith(f"run dir {rdir}: checkpoint {ckpt} holds another model "
                              "(model.name 'resnet18', this config has 'test_resnet')")
    assert sorted(p.name for p in rdir.rglob("*")) == before  # nothing written there
    assert torch.load(ckpt, weights_only=True)["step"] == 4


def test_resuming_from_a_file_shardtrain_did_not_write_is_one_line(stores, tmp_path):
    """A dict of tensors saved by other code (before, KeyError: 'config' from the check above)."""
    weights = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, weights)
    assert refused(write(tmp_path, stores["both"]), f"resume={weights}") == (
        f"resume: {weights} holds no run config, so it was not written by `shardtrain train`; resume from one of its "
        "checkpoints (runs/NAME/checkpoints/*.pt)")
    # before, torch's "mmap can only be used with files saved with `torch.save(_use_new_zipfile_serialization=True)`"
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint at all")
    assert refused(write(tmp_path, stores["both"]), f"resume={tmp_path / 'notes.pt'}") == (
        f"resume: {tmp_path / 'notes.pt'} is not a checkpoint file; resume from one that `shardtrain train` wrote "
        "(runs/NAME/checkpoints/*.pt)")


def test_output_folders_that_are_files_are_one_line(stores, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert refused(write(tmp_path, stores["both"]), f"runs_dir={tmp_path / 'file'}") == (
        f"run dir {tmp_path / 'file' / 't'}: a file stands in its path; give a folder")


@pytest.mark.parametrize("endpoint", ["garbage", "host:abc", ":29500", "node0:0"])
def test_a_rendezvous_endpoint_that_is_no_host_and_port_is_one_line(stores, tmp_path, endpoint):
    """Before, torchrun's traceback: at once for a bad port, after ~150 s of c10d retries for no port at all."""
    with pytest.raises(TrainError) as err:
        launch(write(tmp_path, stores["both"]), nnodes=2, rdzv_endpoint=endpoint)
    assert str(err.value) == f"--rdzv-endpoint must be HOST:PORT, such as node0:29500, not {endpoint}"


def test_a_rendezvous_nobody_answers_ends_in_one_line(tmp_path):
    """Before, torchrun's RendezvousTimeoutError traceback (after its own timeout, shortened here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = subprocess.run([sys.executable, "-m", "training.torchrun", "--nproc-per-node=1", "--nnodes=2",
                           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=t",
                           "--rdzv-conf=read_timeout=3,join_timeout=3", "-m", "training", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: the rendezvous at 127.0.0.1:{port} failed (RendezvousTimeoutError); is the launch on that host "
        "running, and its port open from here?")


def test_a_worker_started_without_launch_names_the_other_model_in_one_line(stores, tmp_path):
    """`python -m training` (no checks before it) meets the other model's checkpoint when it loads it."""
    resnet18_checkpoint(tmp_path, stores["both"])
    proc = subprocess.run([sys.executable, "-m", "training", str(write(tmp_path, stores["both"]))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: the checkpoint to resume from holds another model than test_resnet (")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_missing_store_is_one_line_before_torchrun(tmp_path):
    proc = subprocess.run([SHARDTRAIN, "train", str(write(tmp_path, str(tmp_path / "nostore")))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data.path: no shard store at {tmp_path / 'nostore'} (no manifest.json)"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_store_on_s3_without_credentials_is_one_line_before_torchrun(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    proc = subprocess.run([SHARDTRAIN, "train", str(write(tmp_path, "s3://bucket/store"))],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: data.path: cannot read s3://bucket/store/manifest.json: no S3 "
                                   "credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in "
                                   "the environment")
    assert not (tmp_path / "runs").exists()
