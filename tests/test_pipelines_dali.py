"""data.decode: dali (pipelines/dali.py). The config and its one-line errors run everywhere; with NVIDIA DALI
importable (an optional extra, not in the test install), real worker batches go through DALI's CPU operators
(`device_id=None`) and are checked against `gpu.device_batch` on the same boxes; on a GPU (`pytest -m gpu`) the
mixed (hardware decoder) pipeline against nvJPEG's `gpu` mode through the loader."""

from __future__ import annotations

import dataclasses
import io
import itertools

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

from pipelines import AugmentConfig, DataConfig, DataError, build_loader, dali, gpu
from pipelines.batches import BatchSpec
from pipelines.loader import StoreBatches
from pipelines.store import RawSample
from pipelines.tasks import TASKS
from shards import ConvertOptions, convert, samples
from shards.samples import photo_paths
from tests.test_pipelines_loader import CPU, cfg_for

try:
    import nvidia.dali  # noqa: F401

    DALI_WHY_NOT = None
except ImportError:
    DALI_WHY_NOT = "NVIDIA DALI is not installed (the dali extra)"
needs_dali = pytest.mark.skipif(DALI_WHY_NOT is not None, reason=str(DALI_WHY_NOT))
CUDA = torch.device("cuda")
TRAIN = AugmentConfig(color_jitter=0.0)  # random resized crops and flips: what the workers draw for training


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Class-sorted bundled photos at 96 px: the 32 px crops shrink, the 128 px ones enlarge."""
    root = tmp_path_factory.mktemp("dali")
    samples.make_imagefolder(root / "src", per_class={"train": 8, "val": 2}, size=96, seed=3)
    convert(ConvertOptions(src=str(root / "src"), dest=str(root / "wds"), format="wds", shard_size="6", workers=1),
            progress=False)
    return str(root / "wds")


def test_dali_is_a_decode_mode_of_classify_only_and_explicit():
    assert DataConfig(path="x", decode="dali").decode == "dali"
    with pytest.raises(pydantic.ValidationError, match="decode"):
        DataConfig(path="x", decode="DALI")
    assert "dali" in TASKS["classify"].decoders and "dali" not in TASKS["dino"].decoders


def test_dali_without_a_gpu_or_for_another_task_is_a_one_line_error(store):
    with pytest.raises(DataError) as err:
        build_loader(cfg_for(store, decode="dali"), "val", train=False, task="classify", rank=0, world_size=1,
                     seed=0, device=CPU)
    assert str(err.value) == "data.decode=dali: no CUDA GPU (the device is cpu); use data.decode=auto or cpu"
    with pytest.raises(DataError, match="data.decode=dali supports task classify only, not dino"):
        build_loader(cfg_for(store, decode="dali"), "train", train=True, task="dino", rank=0, world_size=1, seed=0,
                     device=CPU)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_on_the_oriented_image_maps_onto_the_stored_pixels(orientation):
    stored = torch.arange(3 * 5 * 7, dtype=torch.float32).view(3, 5, 7)
    oriented = gpu.apply_orientation(stored, orientation)
    h, w = oriented.shape[1:]
    x0, y0, x1, y1 = 1, 2, 3, 4  # whole pixels: the crop is exact
    box = dali.stored_box((x0, y0, x1, y1), orientation, w, h)
    sx0, sy0, sx1, sy1 = (int(v) for v in box)
    crop = gpu.apply_orientation(stored[:, sy0:sy1, sx0:sx1], orientation)
    assert torch.equal(crop, oriented[:, y0:y1, x0:x1])


def worker_batches(store: str, size: int, batch_size: int = 8):
    """The store's train batches as the workers send them in gpu/hw/dali mode, with their spec."""
    loader = build_loader(cfg_for(store, decode="gpu", workers=0, image_size=size, batch_size=batch_size,
                                  augment=TRAIN), "train", train=True, task="classify", rank=0, world_size=1, seed=0,
                          device=CPU)
    dataset = loader.dataloader.dataset
    assert isinstance(dataset, StoreBatches)
    spec = dataset.spec
    for batch, skipped, failure in itertools.islice(loader.dataloader, len(loader)):  # one epoch (train goes on)
        assert skipped == 0 and failure is None
        yield batch, spec


@needs_dali
@pytest.mark.parametrize("size", [32, 128])
def test_dali_crops_real_worker_batches_as_gpu_mode_does(store, size):
    """DALI's CPU operators against roi_align on the same boxes and flips, one epoch of 48 images: the mean abs
    difference per image (0..255) measured 0.05 on average (0.20 at most) enlarging to 128 px, where both are
    bilinear, and 0.44 (1.5 at most) shrinking to 32, where the filters differ (DALI's linear antialias: 0.95,
    3.3); flips applied (a crop against its mirror image differs by tens of levels)."""
    flips, diffs = 0, []
    batches = list(worker_batches(store, size))
    for (batch, spec), (got, bad) in zip(batches, dali.device_batches(batches, CPU), strict=True):  # 2 in flight
        want, _ = gpu.device_batch(batch, spec, CPU)
        assert bad == [] and got["image"].shape == want["image"].shape == (len(batch["keys"]), 3, size, size)
        assert got["image"].dtype == torch.float32 and torch.equal(got["label"], want["label"])
        per_image = (got["image"] - want["image"]).abs().mean((1, 2, 3))
        mirrored = (got["image"].flip(-1) - want["image"]).abs().mean((1, 2, 3))
        assert (per_image < mirrored).all(), (per_image, mirrored)
        diffs.append(per_image)
        flips += int(batch["flip"].sum())
    diff = torch.cat(diffs)
    assert flips > 0 and diff.mean() < (0.7 if size < 96 else 0.1) and diff.max() < (2.5 if size < 96 else 0.5), diff


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


@needs_dali
def test_dali_orients_as_the_boxes_were_drawn_and_counts_what_it_could_not_decode(capsys):
    """Every EXIF orientation, a PNG (decoded by DALI too) and, in another batch, a sample no decoder reads (the
    batch goes to the CPU path: the sample is a BadSample, the rest as gpu mode gives them; the batch in flight
    behind it comes out of a new pipeline as the first did)."""
    pixels = np.asarray(Image.open(photo_paths()[0]).convert("RGB").resize((72, 48)))
    raws = [RawSample("s", f"o{o}", "jpg", exif_jpeg(pixels, o), {"cls": o}) for o in range(1, 9)]
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    raws.append(RawSample("s", "png", "png", png.getvalue(), {"cls": 9}))
    # enlarged crops (both resizes bilinear), so that what differs is the orientation
    spec = BatchSpec(size=96, train=True, aug=TRAIN.model_copy(update={"hflip": 0.5}), transforms=[])
    batch, bad = gpu.worker_batch(raws, list(range(100, 109)), spec)
    assert bad == [] and batch["orientation"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 1]
    want, _ = gpu.device_batch(batch, spec, CPU)
    dali.FALLBACKS.clear()
    ((got, bad),) = dali.device_batches([(batch, spec)], CPU)
    per_image = (got["image"] - want["image"]).abs().mean((1, 2, 3))
    assert bad == [] and (per_image < 1.0).all(), per_image  # measured 0.10-0.56; a wrong orientation: tens
    assert 0 < int(batch["flip"].sum()) < len(raws)
    assert dali.FALLBACKS == {"png is not a JPEG (decoded by DALI off the hardware decoder)": 1}

    whole = exif_jpeg(pixels, 1)
    cut = whole[:whole.index(b"\xff\xda") + 20]  # its header whole (the worker takes it), its scan cut short
    broken, bad = gpu.worker_batch([raws[0], RawSample("s", "bad", "jpg", cut, {"cls": 0}), raws[5]], [1, 2, 3], spec)
    assert bad == []
    (first, _), (fell_back, bad), (after, _) = dali.device_batches([(batch, spec), (broken, spec), (batch, spec)], CPU)
    want, _ = gpu.device_batch(broken, spec, CPU, decode=dali.decode_on_cpu)
    assert [b.key for b in bad] == ["bad"] and torch.equal(fell_back["image"], want["image"])
    assert torch.equal(first["image"], got["image"]) and torch.equal(after["image"], got["image"])
    assert dali.FALLBACKS["in a batch DALI could not decode (decoded on the CPU)"] == 3
    assert "data.decode=dali: 1 image(s) off DALI's JPEG path" in capsys.readouterr().out


@pytest.mark.gpu
@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_on_cuda_matches_nvjpeg_through_the_loader(store):
    cfg = cfg_for(store, augment=TRAIN, image_size=64, batch_size=8)
    ours, nvjpeg = (build_loader(cfg.model_copy(update={"decode": mode}), "train", train=True, task="classify",
                                 rank=0, world_size=1, seed=0, device=CUDA) for mode in ("dali", "gpu"))
    assert ours.decode_choice == "data.decode: dali (set in the config)"
    batches = 0
    for a, b in zip(ours, nvjpeg, strict=True):
        assert a["image"].is_cuda and a["image"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a["label"], b["label"]) and a["image"].shape == b["image"].shape
        assert (a["image"] - b["image"]).abs().mean() < 0.05  # normalised: ~1 of 255, two decoders and filters
        batches += 1
    assert batches == len(ours) and ours.skipped == 0


@needs_dali
def test_dali_batches_larger_than_its_pipeline_or_of_another_size_come_out_in_order(store):
    """A stream's pipeline holds its first batch's count: a larger batch after it (the first was short of rejected
    samples), and another crop size, go to another pipeline after the batches in flight; each batch comes out as
    it does alone."""
    batches = list(worker_batches(store, 32))
    (batch, spec), (big, _) = batches[0], batches[1]
    short = {key: value[:3] if key != "data" else value for key, value in batch.items()}
    short["data"] = batch["data"][:int(batch["length"][:3].sum())]
    larger = dataclasses.replace(spec, size=48)
    stream = [(short, spec), (big, spec), (short, spec), (big, larger)]
    alone = [next(dali.device_batches([item], CPU))[0]["image"] for item in stream]
    got = [out["image"] for out, bad in dali.device_batches(stream, CPU)]
    assert [tuple(g.shape) for g in got] == [(3, 3, 32, 32), (8, 3, 32, 32), (3, 3, 32, 32), (8, 3, 48, 48)]
    assert all(torch.equal(g, a) for g, a in zip(got, alone, strict=True))
