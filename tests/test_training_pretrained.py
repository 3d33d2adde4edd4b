"""`model.pretrained: true`: timm's weights through the Hugging Face cache, offline.

No hub is reachable here, so each test fills a cache directory the way huggingface_hub lays one out
(`hub/models--timm--NAME/snapshots/REV/model.safetensors` and `refs/main`) with weights it made, sets
HF_HOME and HF_HUB_OFFLINE=1 (for the processes it starts; huggingface_hub's module constants, read
at its import, for this one), and checks the model started from exactly those weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from huggingface_hub import constants as hf_constants

from shards import ConvertOptions, convert
from training import TrainError
from training.config import ModelConfig, validate
from training.dist import World
from training.model import build_model, hub_weights
from training.tasks.detect import build_detector
from training.tasks.dino import DinoTask

SHARDTRAIN = str(Path(sys.executable).with_name("shardtrain"))
REPO = Path(__file__).resolve().parents[1]
NAME = "test_resnet.r160_in1k"  # one of timm's tiny test models, with weights on the hub
REVISION = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(hf_home: Path, name: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """Put weights for timm's `name` into the Hugging Face cache at `hf_home`; returns them."""
    torch.manual_seed(seed)
    weights = timm.create_model(name.partition(".")[0]).state_dict()
    repo = hf_home / "hub" / f"models--timm--{name}"
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    safetensors.torch.save_file(weights, repo / "snapshots" / REVISION / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return weights


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline, for this process and the ones it starts."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("pretrained-store") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest)), progress=False)
    return str(dest)


def assert_body_is(model: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every tensor but the classifier's equals the cached one."""
    state = model.state_dict()
    body = [k for k in weights if not k.startswith("fc.")]
    assert body and all(torch.equal(state[prefix + k], weights[k]) for k in body)


def test_pretrained_true_loads_the_cached_weights_with_a_new_head(hf_home, tmp_path):
    weights = fill_cache(hf_home, NAME)
    assert hub_weights(NAME) == str(hf_home / "hub" / f"models--timm--{NAME}" / "snapshots" / REVISION /
                                    "model.safetensors")
    model = build_model(ModelConfig(name=NAME, pretrained=True), num_classes=3, cache_dir=tmp_path)
    assert_body_is(model, weights)
    assert model.get_classifier().out_features == 3  # the store's classes, not ImageNet's
    untagged = build_model(ModelConfig(name="test_resnet", pretrained=True), 3, tmp_path)  # timm's default tag
    assert_body_is(untagged, weights)


def test_detector_body_and_dino_teacher_start_from_the_cached_weights(hf_home, store, tmp_path):
    weights = fill_cache(hf_home, NAME)
    common = {"name": "t", "data": {"path": store, "image_size": 64, "workers": 0},
              "model": {"name": NAME, "pretrained": True}}
    detector = build_detector(validate({**common, "task": "detect", "detect": {"fpn_channels": 64}}), 3, tmp_path)
    body = detector.backbone.body.state_dict()
    shared = [k for k in body if k in weights]  # features_only: the stem and stages, no head
    assert len(shared) == len(body) and all(torch.equal(body[k], weights[k]) for k in shared)

    dino = validate({**common, "task": "dino", "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}})
    model = DinoTask(dino, [], World(0, 0, 1, torch.device("cpu")), tmp_path).build_model()
    teacher = model.teacher.module.backbone.state_dict()
    assert all(torch.equal(teacher[k], weights[k]) for k in teacher)


def test_offline_with_an_empty_cache_is_one_line_naming_the_model_and_fixes(hf_home):
    with pytest.raises(TrainError) as err:
        hub_weights("deit_small_patch16_224.fb_in1k")
    message = str(err.value)
    assert "\n" not in message
    assert "deit_small_patch16_224.fb_in1k" in message and "HF_HUB_OFFLINE=1" in message
    assert "fill that cache" in message and "set model.pretrained to a local path or URL" in message


def write_config(tmp_path: Path, store: str, **model) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "runs_dir": str(tmp_path / "runs"),
        "data": {"path": store, "image_size": 32, "batch_size": 8, "workers": 0, "pin_memory": False,
                 "channels_last": False},
        "model": model,
    }))
    return path


def test_finetune_recipe_starts_from_the_cached_weights(hf_home, store, tmp_path):
    """configs/deit_small_finetune.yaml (layer decay, drop path, mixup/cutmix, label smoothing, warm-up) with a
    tiny timm model, through `shardtrain train` (torchrun and its worker inherit HF_HOME and HF_HUB_OFFLINE)."""
    weights = fill_cache(hf_home, NAME)
    small = [f"runs_dir={tmp_path / 'runs'}", "name=t", f"data.path={store}", "data.image_size=32",
             "data.batch_size=8", "data.workers=0", "data.pin_memory=false", f"model.name={NAME}",
             "train.epochs=1", "train.max_steps=1",
             # A vanishing step size: after one step the weights are still the starting ones to ~1e-9.
             "optim.lr=1.0e-9", "optim.lr_base_batch=null", "optim.weight_decay=0"]
    recipe = REPO / "configs" / "deit_small_finetune.yaml"
    proc = subprocess.run([SHARDTRAIN, "train", str(recipe), *small], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trained = torch.load(tmp_path / "runs" / "t" / "checkpoints" / "last.pt", weights_only=True)["model"]
    convs = [k for k, v in weights.items() if v.ndim == 4]  # every conv kernel (BN statistics move in a step)
    assert convs and all(torch.allclose(trained[k], weights[k], rtol=0, atol=1e-6) for k in convs)
    torch.manual_seed(0)
    random_init = timm.create_model("test_resnet").state_dict()
    assert not any(torch.allclose(trained[k], random_init[k], rtol=0, atol=1e-6) for k in convs)


def test_cli_offline_empty_cache_fails_before_torchrun_in_one_line(hf_home, store, tmp_path):
    config = write_config(tmp_path, store, name="test_vit.r160_in1k", pretrained=True)
    proc = subprocess.run([SHARDTRAIN, "train", str(config)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: model.pretrained: timm's weights for test_vit.r160_in1k")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()
