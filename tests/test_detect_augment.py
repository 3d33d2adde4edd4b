"""The detection train augmentation on real objects (coins of the bundled coins photo, boxed by segmentation):
mosaic cells at the letterbox scale, objects that keep their shape through the scale jitter, slivers dropped by
the visibility and aspect rule, and the shipped recipe learning nearly as fast as no augmentation (issue 22)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import AugmentConfig, build_loader
from pipelines.batches import detect_batch
from pipelines.store import RawSample
from pipelines.tasks import TASKS
from shards import ConvertOptions, convert
from shards.samples import make_coins
from training.config import validate
from training.optim import StepPlan, build_optimizer, build_scheduler
from training.tasks.detect import build_detector, targets_of

SIZE = 128
STILL = {"scale_jitter": 0.0, "translate": 0.0, "hflip": 0.0, "hsv": (0.0, 0.0, 0.0)}


@pytest.fixture(scope="module")
def one_coin(tmp_path_factory) -> tuple[RawSample, np.ndarray, float]:
    """The most elongated of a few one-coin windows of the photo: its sample, its coin's box at the letterbox
    scale, and its aspect (the wider the window, the more a mosaic cell at another scale shows)."""
    src = make_coins(tmp_path_factory.mktemp("coin"), per_split={"train": 8}, coins={"train": (1, 1)}, seed=3)
    best = None
    for image in sorted((src / "images" / "train").glob("*.jpg")):
        row = [float(v) for v in (src / "labels" / "train" / f"{image.stem}.txt").read_text().split()]
        raw = RawSample("local", image.stem, "jpg", image.read_bytes(), {"boxes": [row[1:]], "labels": [0]})
        w, h = Image.open(image).size
        aspect = max(w, h) / min(w, h)
        if best is None or aspect > best[2]:
            cx, cy, bw, bh = row[1:]
            scale = SIZE / max(w, h)
            best = (raw, np.array([bw * w * scale, bh * h * scale]), aspect)
    assert best is not None, f"no images in {src}"
    return best


def train_boxes(raw: RawSample, aug: AugmentConfig, seeds: range) -> list[np.ndarray]:
    """Output boxes of the train preset, the sample being its own three mosaic partners."""
    spec = TASKS["detect"].spec(True, SIZE, aug)
    out = []
    for seed in seeds:
        batch, bad = detect_batch([raw] * 4, [seed * 4 + i for i in range(4)], spec)
        assert not bad
        out += [b.numpy() for b in TASKS["detect"].received(batch)["boxes"]]  # per image, as the loader gives them
    return out


def test_mosaic_cells_are_at_the_letterbox_scale_and_slivers_are_dropped(one_coin):
    raw, whole, aspect = one_coin
    assert aspect > 1.3  # otherwise a cell's scale could not differ from the letterbox's
    aug = AugmentConfig(mosaic=1.0, **STILL)
    boxes = np.concatenate(train_boxes(raw, aug, range(12)))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # no box is larger than the coin letterboxed (a "cover" cell scaled it by the window's aspect), and the
    # whole coin appears at exactly that size
    assert (w <= whole[0] + 1).all() and (h <= whole[1] + 1).all(), (boxes, whole)
    assert (np.abs(np.stack([w, h], 1) - whole).max(axis=1) <= 1).any()
    # the rule: at least a quarter of the coin's box in view, sides at most 20 to 1
    assert (w * h >= aug.min_visibility * whole.prod() - 1).all(), (w * h / whole.prod()).min()
    assert (np.maximum(w / h, h / w) <= aug.max_aspect).all()


def test_scale_jitter_keeps_the_objects_shape(one_coin):
    raw, whole, _ = one_coin
    aug = AugmentConfig(mosaic=0.0, **{**STILL, "scale_jitter": 0.5})
    ratios = []
    for boxes in train_boxes(raw, aug, range(12)):
        for x0, y0, x1, y1 in boxes:
            if 1 < x0 and 1 < y0 and x1 < SIZE - 1 and y1 < SIZE - 1:  # whole in view
                ratios.append(((x1 - x0) / (y1 - y0)) / (whole[0] / whole[1]))
    assert len(ratios) >= 6
    np.testing.assert_allclose(ratios, 1.0, atol=0.06)  # one scale for both axes: a coin stays round


def test_close_mosaic_turns_mosaic_off_for_the_last_epochs(tmp_path):
    """Mosaic on one-coin windows shows several coins an image; closed, each image is its own window: one coin."""
    src = make_coins(tmp_path / "src", per_split={"train": 8}, coins={"train": (1, 1)}, seed=3)
    convert(ConvertOptions(src=str(src), dest=str(tmp_path / "store"), format="wds"), progress=False)
    cfg = validate({"name": "t", "task": "detect", "model": {"name": "test_resnet"},
                    "data": {"path": str(tmp_path / "store"), "image_size": SIZE, "batch_size": 4, "workers": 1,
                             "pin_memory": False, "augment": {"mosaic": 1.0, "close_mosaic": 2, **STILL}}})
    loader = build_loader(cfg.data, "train", train=True, task="detect", rank=0, world_size=1, seed=0,
                          device=torch.device("cpu"))
    plan = StepPlan(len(loader), 1, 0, 10, 2 * 3 + 1)  # max_steps ends the run in its 4th epoch of 2 steps
    assert plan.epochs_run == 4
    loader.plan_epochs(plan.epochs_run)
    coins = []
    for epoch in range(plan.epochs_run):
        loader.set_epoch(epoch)
        coins.append([len(boxes) for batch in loader for boxes in batch["boxes"]])
    assert all(n == [1] * 8 for n in coins[2:]), coins
    assert all(max(n) > 1 for n in coins[:2]), coins


def test_zoomed_splits_show_the_held_out_coins_farther_and_nearer(tmp_path):
    """make_coins' zoom: each image's coins, once letterboxed, at the asked factor of a plain window's."""
    splits = {"val": None, "far": (0.3, 0.5), "near": (1.5, 2.0)}
    src = make_coins(tmp_path, per_split={s: 24 for s in splits}, coins={s: (2, 6) for s in splits}, seed=2,
                     zoom={s: z for s, z in splits.items() if z})
    sizes = {}
    for split in splits:
        sizes[split] = []
        for label in sorted((src / "labels" / split).glob("*.txt")):
            w, h = Image.open(src / "images" / split / f"{label.stem}.jpg").size
            boxes = np.loadtxt(label, ndmin=2)[:, 1:] * [w, h, w, h]
            sizes[split].append(np.maximum(boxes[:, 2], boxes[:, 3]).mean() / max(w, h))
    val = np.median(sizes["val"])
    assert 0.25 * val < np.median(sizes["far"]) < 0.6 * val, sizes
    assert 1.3 * val < np.median(sizes["near"]) < 2.3 * val, sizes


@pytest.fixture(scope="module")
def coins_store(tmp_path_factory) -> str:
    """24 train windows of 3 to 8 real coins each."""
    tmp = tmp_path_factory.mktemp("coins")
    src = make_coins(tmp / "src", per_split={"train": 24}, coins={"train": (3, 8)}, seed=1)
    convert(ConvertOptions(src=str(src), dest=str(tmp / "store"), format="wds"), progress=False)
    return str(tmp / "store")


def losses(store: str, augment: dict, steps: int) -> list[float]:
    """Per-step train loss of FCOS (test_resnet body, from scratch) with configs/detector.yaml's optimizer."""
    cfg = validate({"name": "t", "task": "detect", "seed": 0,
                    "data": {"path": store, "image_size": 96, "batch_size": 8, "workers": 0, "pin_memory": False,
                             "channels_last": False, "augment": augment},
                    "model": {"name": "test_resnet"}, "detect": {"fpn_channels": 64, "head_convs": 2},
                    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 1,
                              "clip_grad": 10.0}})
    loader = build_loader(cfg.data, "train", train=True, task="detect", rank=0, world_size=1, seed=0,
                          device=torch.device("cpu"))
    torch.manual_seed(0)
    model = build_detector(cfg, 1, Path("."))
    optimizer = build_optimizer(cfg.optim, model, cfg.optim.lr)
    plan = StepPlan(len(loader), 1, 0, -(-steps // len(loader)), steps)
    scheduler = build_scheduler(cfg.optim, optimizer, plan)
    clip = cfg.optim.clip_grad
    assert clip is not None  # set above
    out: list[float] = []
    for epoch in range(plan.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            loss = sum(model(list(batch["image"]), targets_of(batch)).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            out.append(loss.item())
            scheduler.step_update(len(out))
            if len(out) == steps:
                return out
    return out


def test_shipped_augmentation_learns_nearly_as_fast_as_none(coins_store):
    """30 steps from scratch: the loss falls with the shipped augmentation by at least 0.7 of its fall without
    any (issue 22: the old preset stalled on real photos). On the dev machine: 1.64 against 1.91 (0.85); with
    the additive HSV shifts before YOLO's gains, 1.60 (0.83); with the preset before the first fix, 1.21 (0.63)."""
    shipped = AugmentConfig()
    assert (shipped.mosaic, shipped.scale_jitter) == (0.5, 0.5)  # configs/detector.yaml's values, the defaults
    steps = 30
    with_aug = losses(coins_store, {}, steps)
    without = losses(coins_store, {"mosaic": 0.0, "scale_jitter": 0.0, "translate": 0.0, "hflip": 0.0,
                                   "hsv": [0.0, 0.0, 0.0]}, steps)
    fall = {name: np.mean(ls[:3]) - np.mean(ls[-6:]) for name, ls in (("shipped", with_aug), ("none", without))}
    assert fall["none"] > 0.5, fall  # the model learns at all
    assert fall["shipped"] >= 0.7 * fall["none"], fall
