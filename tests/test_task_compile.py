"""train.compile for DINO and detection on the CPU (dynamo with its eager backend: the graphs, graph breaks and
recompiles inductor would get, without the minutes of its C++ build): what compiles has no graph break, the
compiled step gives the eager step's loss, the state dict keeps its keys; DINO's forward grouped by crop size
equals one pass per crop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from training.config import validate
from training.dist import World
from training.tasks.detect import DetectTask
from training.tasks.dino import DinoTask, dino_loss

ONE = World(0, 0, 1, torch.device("cpu"))


def dino_task() -> DinoTask:
    cfg = validate({
        "name": "dino", "task": "dino", "data": {"path": "unused", "image_size": 32,
                                                  "augment": {"local_crops": 3, "local_size": 16}},
        "eval": {"knn_path": None},
        "model": {"name": "vit_tiny_patch16_224", "drop_path": 0.0,
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "dynamic_img_size": True}},
        "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
    })
    assert cfg.dino is not None
    task = DinoTask.__new__(DinoTask)  # knn_data() would read a store; these tests need the model alone
    task.cfg, task.dino, task.world, task.cache_dir = cfg, cfg.dino, ONE, Path("unused")
    task.crops = 5
    return task


def detect_task(head: str) -> DetectTask:
    cfg = validate({"name": "d", "task": "detect", "data": {"path": "unused", "image_size": 64},
                    "model": {"name": "test_resnet"}, "detect": {"head": head, "fpn_channels": 32}})
    return DetectTask(cfg, ["a", "b", "c"], ONE, Path("."))


def crops(batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(3)]


def test_dino_forward_grouped_by_size_equals_one_pass_per_crop():
    torch.manual_seed(0)
    task = dino_task()
    model = task.build_model().eval()  # no dropped paths: both forwards see the same network
    views = crops()
    with torch.no_grad():
        grouped, _ = model.student(views)
        per_crop = torch.cat([model.student.head(model.student.backbone(c)) for c in views])
        teacher = torch.cat([model.teacher.module.head(model.teacher.module.backbone(c)) for c in views[:2]])
        center = torch.randn(1, 64)
    torch.testing.assert_close(grouped, per_crop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dino_loss(grouped, teacher, center, 5, 0.1, 0.04),
                               dino_loss(per_crop, teacher, center, 5, 0.1, 0.04), rtol=1e-6, atol=1e-6)


def test_dino_compiled_model_gives_the_eager_loss_and_keeps_its_keys():
    torch.manual_seed(0)
    task = dino_task()
    model = task.build_model()
    views = crops()
    eager_student, eager_teacher, _ = model(views)
    keys = list(model.state_dict())
    compiled = task.compile(model, backend="eager")
    student, teacher, _ = compiled(views)
    torch.testing.assert_close(student, eager_student, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher, eager_teacher, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys  # checkpoints hold the unwrapped model


def boxes(counts: list[int], size: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(sum(counts))
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * (size - 20)
        out.append({"boxes": torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 16], 1),
                    "labels": torch.randint(0, 3, (n,), generator=g)})
    return out


@pytest.mark.parametrize("head", ["fcos", "retinanet"])
def test_detector_compiles_without_graph_breaks_keeps_the_loss_and_recompiles_only_for_a_few_box_counts(head):
    torch.manual_seed(0)
    task = detect_task(head)
    model = task.build_model()
    images = [torch.randn(3, 64, 64) for _ in range(2)]
    # six different batch maxima of boxes an image
    counts = [[1, 0], [5, 2], [9, 3], [0, 12], [30, 7], [40, 1]]
    eager = [sum(model(images, boxes(c)).values()) for c in counts]
    keys = list(model.state_dict())
    torch._dynamo.reset()
    counters.clear()
    assert task.compile(model, backend="eager") is model  # compiled in place
    losses = [sum(model(images, boxes(c)).values()) for c in counts]
    # one whole graph each for the body + FPN and the head; the loss's first (8 boxes), then one general in the
    # box count: six batch maxima compile the loss twice, not six times
    assert counters["stats"]["unique_graphs"] == 4 and not counters["graph_break"], dict(counters["graph_break"])
    for loss, expected in zip(losses, eager):
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    losses[-1].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert list(model.state_dict()) == keys
