"""One GPU: AMP bf16 and fp16 (+ GradScaler), channels_last, torch.compile, through the real trainer."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import hw
from shards import ConvertOptions, convert

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("gpu-store") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def train_once(tmp_path: Path, store: str, *overrides: str, env: dict[str, str] | None = None) -> tuple[dict, str, str]:
    """The last checkpoint of an 8-step run, its stdout (the run's log) and its stderr (library warnings)."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "g", "runs_dir": str(tmp_path / "runs"),
        "data": {"path": store, "image_size": 64, "batch_size": 16, "workers": 1},
        "model": {"name": "resnet18"},
        "train": {"epochs": 2, "max_steps": 8, "log_every": 2},
        "checkpoint": {"every_steps": 4},
    }))
    proc = subprocess.run([sys.executable, "-m", "training", str(config), *overrides], capture_output=True,
                          text=True, timeout=400, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "runs" / "g"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 8 and math.isfinite(metrics["final"]["train_loss"])
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True), proc.stdout, proc.stderr


def test_bf16_channels_last_compile(store, tmp_path):
    ckpt, out, _ = train_once(tmp_path, store, "train.amp=bf16", "data.channels_last=true", "train.compile=true")
    assert "on cuda, amp bfloat16" in out
    assert ckpt["scaler"] == {}  # no GradScaler with bf16
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())


def test_fp16_uses_grad_scaler(store, tmp_path):
    ckpt, out, _ = train_once(tmp_path, store, "train.amp=fp16")
    assert "on cuda, amp float16" in out
    assert ckpt["scaler"]["scale"] > 0


def test_auto_amp_picks_bf16_where_supported(store, tmp_path):
    _, out, _ = train_once(tmp_path, store, "train.ema_decay=0.99")
    assert f"amp {'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'}" in out


def test_gpu_decode_under_compile_keeps_losses_finite(store, tmp_path):
    # nvJPEG's hardware decoder once wrote into memory that queued compiled kernels still read,
    # turning every loss into NaN (pipelines/gpu.py decodes on a drained stream of its own since).
    ckpt, out, _ = train_once(tmp_path, store, "data.decode=gpu", "train.amp=bf16", "train.compile=true")
    assert "nan" not in out.lower()
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.skipif(hw.unavailable(torch.device("cuda")) is not None, reason="no usable hardware JPEG decoder")
def test_auto_picks_the_hardware_decoder_and_losses_stay_finite_under_compile(store, tmp_path):
    # the default colour jitter included: applied on the device, under the compiled step
    ckpt, out, _ = train_once(tmp_path, store, "data.decode=auto", "train.amp=bf16", "train.compile=true")
    assert "data.decode: hw (auto: nvImageCodec " in out
    assert "nan" not in out.lower()
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_cuda_graphs_train_as_the_default_compile_does(store, tmp_path):
    # reduce-overhead replays the compiled step as CUDA graphs: the same kernels, so with deterministic kernels
    # the same weights, batch norm's running statistics (buffers the graphs update in place) included
    (tmp_path / "default").mkdir()
    (tmp_path / "graphs").mkdir()
    default, _, _ = train_once(tmp_path / "default", store, "train.compile=true", "train.deterministic=true")
    graphs, _, hints = train_once(tmp_path / "graphs", store, "train.compile=true",
                                  "train.compile_mode=reduce-overhead", "train.deterministic=true",
                                  env={"TORCH_LOGS": "perf_hints"})
    assert "skipping cudagraphs" not in hints  # inductor's hint when it falls back to launching kernels
    for key, value in default["model"].items():
        if value.is_floating_point():
            assert torch.allclose(graphs["model"][key], value, rtol=1e-3, atol=1e-5), key


def test_train_profile_on_a_gpu_says_how_busy_it_was_and_its_busiest_stream(store, tmp_path):
    """With the decode on the GPU (a stream of its own) the step's stream is not the only one: the busy share counts
    time any stream runs once, the busiest stream's is at most that (before: kernel time summed over streams, which
    read 100% for a step whose own stream idled 10%)."""
    _, out, _ = train_once(tmp_path, store, "data.decode=gpu", "train.profile=[3,3]")
    summary = re.search(r"profile: 3 steps, [\d.]+ ms a step, GPU busy (\d+)% \(its busiest stream (\d+)%; \d+ "
                        r"kernels and copies a step\); the top kernels:\n((?:  .*\n)+)", out)
    assert summary, out[-3000:]
    anything, busiest = int(summary[1]), int(summary[2])
    assert 0 < busiest <= anything <= 100 and len(summary[3].splitlines()) == 10, summary[0]
