"""data.decode: hw (nvImageCodec's hardware JPEG decoder) and auto: the choice and its reason, the config, the
per-image CPU fallback; on a GPU with the engines (`pytest -m gpu`), the decode itself against nvJPEG's."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines import AugmentConfig, DataConfig, DataError, build_loader, hw
from pipelines.tasks import TASKS
from shards import ConvertOptions, convert
from tests.test_pipelines_loader import CPU, FIXED, cfg_for, loaders, make_store

CUDA = torch.device("cuda")
HW_WHY_NOT = hw.unavailable(CUDA if torch.cuda.is_available() else CPU)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return make_store(tmp_path_factory.mktemp("store"), "wds", {"train": 9, "val": 3}, "5")


def encoded(fmt: str, seed: int, **save) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **save)
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


def test_decode_defaults_to_auto_and_takes_only_known_modes():
    assert DataConfig(path="x").decode == "auto"
    for mode in ("auto", "cpu", "gpu", "hw"):
        assert DataConfig(path="x", decode=mode).decode == mode
    with pytest.raises(pydantic.ValidationError, match="decode"):
        DataConfig(path="x", decode="nvjpeg")


@pytest.mark.skipif(HW_WHY_NOT is None, reason="this host has a usable hardware JPEG decoder")
def test_auto_falls_to_cpu_decode_with_the_reason(store):
    (auto,) = loaders(cfg_for(store, workers=0, decode="auto"), "val", train=False, world_size=1)
    assert auto.decode_choice == f"data.decode: cpu (auto: {HW_WHY_NOT})"
    (jitter,) = loaders(cfg_for(store, augment=AugmentConfig(), decode="auto"), "train", train=True, world_size=1)
    assert jitter.decode_choice == auto.decode_choice  # the device half applies the jitter too
    (cpu,) = loaders(cfg_for(store, workers=0, decode="cpu"), "val", train=False, world_size=1)
    assert cpu.decode_choice == "data.decode: cpu (set in the config)"
    (default,) = loaders(cfg_for(store, workers=0), "val", train=False, world_size=1)
    assert default.decode_choice == auto.decode_choice
    for a, b in zip(auto, cpu, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_auto_leaves_decode_to_many_cpu_workers_on_any_device(store):
    # with more than the task's bound the workers decode full-size JPEGs as fast as the hardware decoder feeds the
    # step, without taking a share of the GPU and of the training process (bench/RESULTS.md, issue 19)
    for task, bound in (("classify", 6), ("dino", 8)):
        data = TASKS[task]
        assert data.auto_hw_workers == bound
        for device in (CPU, CUDA):
            mode, why = hw.choose("auto", data.decoders, device, bound + 1, data.auto_hw_workers)
            assert (mode, why) == ("cpu", f"auto: {bound + 1} CPU workers decode as fast (hw with {bound} or fewer)")
        mode, why = hw.choose("auto", data.decoders, CPU, bound, data.auto_hw_workers)
        assert (mode, why) == ("cpu", "auto: no CUDA GPU (the device is cpu)")
    (many,) = loaders(cfg_for(store, workers=12), "val", train=False, world_size=1)
    assert many.decode_choice == "data.decode: cpu (auto: 12 CPU workers decode as fast (hw with 6 or fewer))"


@pytest.fixture(scope="module")
def yolo_store(yolo_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("yolo") / "store"
    convert(ConvertOptions(src=str(yolo_src), dest=str(dest), format="wds", workers=1), progress=False)
    return str(dest)


def test_auto_keeps_detection_on_the_cpu_and_gives_dino_the_same_reasons_as_classify(store, yolo_store):
    detect = build_loader(cfg_for(yolo_store, decode="auto"), "train", train=True, task="detect", rank=0,
                          world_size=1, seed=0, device=CPU)
    assert detect.decode_choice == "data.decode: cpu (auto: this task decodes in the CPU workers only)"
    dino = build_loader(cfg_for(store, augment=AugmentConfig(), decode="auto"), "train", train=True, task="dino",
                        rank=0, world_size=1, seed=0, device=CPU)
    assert dino.decode_choice == "data.decode: cpu (auto: no CUDA GPU (the device is cpu))"


def test_hw_for_another_task_or_without_the_engines_is_a_one_line_error(store, yolo_store):
    with pytest.raises(DataError, match="data.decode=hw supports task classify or dino only, not detect"):
        build_loader(cfg_for(yolo_store, decode="hw"), "train", train=True, task="detect", rank=0, world_size=1,
                     seed=0, device=CPU)
    with pytest.raises(DataError) as err:
        loaders(cfg_for(store, decode="hw"), "val", train=False, world_size=1)
    assert str(err.value) == "data.decode=hw: no CUDA GPU (the device is cpu); use data.decode=auto or cpu"
    with pytest.raises(DataError) as err:
        build_loader(cfg_for(store, decode="hw"), "train", train=True, task="dino", rank=0, world_size=1, seed=0,
                     device=CPU)
    assert str(err.value) == "data.decode=hw: no CUDA GPU (the device is cpu); use data.decode=auto or cpu"


def test_images_the_hardware_gave_none_for_are_decoded_on_the_cpu_and_counted(capsys):
    hw.FALLBACKS.clear()
    jpeg, png, webp = encoded("JPEG", 1, quality=95), encoded("PNG", 2), encoded("WEBP", 3, lossless=True)
    corrupt = jpeg[: len(jpeg) // 3]
    data = [jpeg, png, jpeg, webp, corrupt, png]
    keys = [("s", f"k{i}", ext) for i, ext in enumerate(["jpg", "png", "jpg", "webp", "jpeg", "png"])]
    canvas = torch.full((6, 30, 50, 3), 7, dtype=torch.uint8)
    slots = [canvas[i, :24, :40] for i in range(5)] + [canvas[5, :20, :40]]  # the last: its header misread
    refused = "the hardware decoder refused the jpg"
    why = [refused, "png is not a JPEG", None, "webp is not a JPEG", refused, "png is not a JPEG"]
    out = hw.cpu_fallback(data, keys, slots, why)

    assert out[:4] == [None] * 4
    assert torch.equal(slots[0], decode_jpeg(jpeg, mode=ImageReadMode.RGB).permute(1, 2, 0))
    assert torch.equal(slots[1], torch.from_numpy(np.array(Image.open(io.BytesIO(png.numpy().tobytes())))))
    assert (slots[2] == 7).all()  # what the hardware decoded is left as it is
    assert not (slots[3] == 7).all()
    assert (canvas[:, 24:] == 7).all() and (canvas[:, :, 40:] == 7).all()  # nothing written past a slot
    assert isinstance(out[4], RuntimeError)  # the CPU cannot decode it either: a corrupt sample
    assert str(out[5]) == "decoded 40x24, its header says 40x20"
    assert hw.FALLBACKS == {refused: 2, "png is not a JPEG": 2, "webp is not a JPEG": 1}
    assert capsys.readouterr().out == f"data.decode=hw: 1 image(s) decoded on the CPU instead (1 {refused})\n"
    for _ in range(5):  # the line again at the 10th
        hw.cpu_fallback([png], [("s", "k", "png")], [canvas[0, :24, :40]], ["png is not a JPEG"])
    assert "data.decode=hw: 10 image(s) decoded on the CPU instead (7 png is not a JPEG," in capsys.readouterr().out


def cuda_loader(cfg: DataConfig, **update):
    return build_loader(cfg.model_copy(update=update), "val", train=False, task="classify", rank=0, world_size=1,
                        seed=0, device=CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(HW_WHY_NOT is not None, reason=f"no hardware decoder: {HW_WHY_NOT}")
def test_hw_decode_on_cuda_matches_nvjpeg_and_falls_back_per_image(store):
    cfg = cfg_for(store, augment=FIXED)
    hw_loader, nvjpeg, auto = (cuda_loader(cfg, decode=mode) for mode in ("hw", "gpu", "auto"))
    assert auto.decode_choice.startswith("data.decode: hw (auto: nvImageCodec ")
    jitter = cuda_loader(cfg, augment=AugmentConfig(), decode="auto")
    assert jitter.decode_choice == auto.decode_choice  # classify's colour jitter runs on the device too
    batches = 0
    for a, b in zip(hw_loader, nvjpeg, strict=True):
        assert a["image"].is_cuda and a["image"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a["label"], b["label"])
        assert (a["image"] - b["image"]).abs().mean() < 0.05  # two JPEG decoders: IDCT and upsampling differ
        batches += 1
    assert batches == len(hw_loader) and hw_loader.skipped == 0

    hw.FALLBACKS.clear()
    jpeg, png = encoded("JPEG", 1, quality=95), encoded("PNG", 2)
    keys = [("s", "a", "jpg"), ("s", "b", "png"), ("s", "c", "jpg"), ("s", "d", "jpg")]
    # Not a JPEG at all: neither decoder takes it. (A truncated JPEG the hardware decodes, grey where data is
    # missing, as nvJPEG does; the CPU's libjpeg refuses it.)
    garbage = torch.frombuffer(bytearray(b"\xff\xd8\xff" + bytes(range(256)) * 4), dtype=torch.uint8)
    canvas = torch.zeros((4, 30, 50, 3), dtype=torch.uint8, device=CUDA)
    slots = [canvas[0, :24, :40], canvas[1, :24, :40], canvas[2, :10, :10], canvas[3, :20, :40]]  # the last: misread
    out = hw.decode_batch([jpeg, png, garbage, jpeg], keys, slots)
    torch.cuda.synchronize()
    assert out[:2] == [None, None] and isinstance(out[2], RuntimeError)
    assert str(out[3]) == "decoded 40x24, its header says 40x20"
    want = decode_jpeg(jpeg, mode=ImageReadMode.RGB).permute(1, 2, 0).float()
    assert (slots[0].cpu().float() - want).abs().mean() < 3  # written in its slot, rows pitched at the canvas's
    assert torch.equal(slots[1].cpu(), torch.from_numpy(np.array(Image.open(io.BytesIO(png.numpy().tobytes())))))
    assert not canvas[:2, 24:].any() and not canvas[:2, :, 40:].any()
    assert hw.FALLBACKS["png is not a JPEG"] == 1 and hw.FALLBACKS.total() == 3
    assert hw.FALLBACKS["nvImageCodec reads another size in the jpg's header"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(HW_WHY_NOT is not None, reason=f"no hardware decoder: {HW_WHY_NOT}")
def test_the_hardware_decoder_starts_without_the_jpeg2000_and_tiff_extensions_errors():
    # A fresh process: nvImageCodec loads its extensions once, at its import.
    probe = ("import os, torch; from pipelines import hw; print(hw.unavailable(torch.device('cuda'))); "
             "print('NVIMGCODEC_EXTENSIONS_PATH' in os.environ)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "NVIMGCODEC_EXTENSIONS_PATH"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-2:] == ["None", "False"]
    assert "nvjpeg2k" not in (run.stdout + run.stderr).lower() and "nvtiff" not in (run.stdout + run.stderr).lower()
