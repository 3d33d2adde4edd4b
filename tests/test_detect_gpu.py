"""One GPU: detection under AMP (bf16, fp16 + GradScaler) with channels_last through the real trainer, eager and
compiled (the convolutions and the batch loss), then predict."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from shards import ConvertOptions, convert
from shards.samples import make_yolo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("gpu-detect")
    src = make_yolo(tmp / "src", per_split={"train": 32, "val": 8}, size=128, seed=3)
    convert(ConvertOptions(src=str(src), dest=str(tmp / "store"), format="wds"), progress=False)
    return src, str(tmp / "store")


@pytest.mark.parametrize(("head", "amp", "compiled"), [("fcos", "bf16", False), ("fcos", "fp16", False),
                                                       ("fcos", "bf16", True), ("retinanet", "bf16", True)])
def test_detect_amp_channels_last_then_predict(store, tmp_path, head, amp, compiled):
    src, path = store
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "g", "runs_dir": str(tmp_path / "runs"), "task": "detect",
        "data": {"path": path, "image_size": 128, "batch_size": 8, "workers": 1, "channels_last": True},
        "model": {"name": "resnet18"},
        "detect": {"head": head, "fpn_channels": 64},
        "train": {"epochs": 2, "max_steps": 8, "log_every": 2, "amp": amp, "compile": compiled},
        "checkpoint": {"every_steps": 4},
    }))
    proc = subprocess.run([sys.executable, "-m", "training", str(config)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"amp {'bfloat16' if amp == 'bf16' else 'float16'}" in proc.stdout
    run = tmp_path / "runs" / "g"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric"] == "val_map" and metrics["step"] == 8
    assert math.isfinite(metrics["final"]["train_loss"]) and 0 <= metrics["final"]["val_map"] <= 1
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["scaler"]["scale"] > 0) if amp == "fp16" else ckpt["scaler"] == {}

    from training import load_config
    from training.predict import predict

    records = predict(load_config(config), str(run / "checkpoints" / "best.pt"), [src / "images" / "val"],
                      tmp_path / "pred", conf=0.0)
    assert len(records) == 8 and all(r["width"] == 128 and r["detections"] for r in records)
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text()) == records
