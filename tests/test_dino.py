"""DINO's parts against computations written out here: loss, centering, KoLeo, schedules, k-NN,
and one step of a tiny ViT on a real store through the task's hooks (teacher = EMA of the student)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines import build_loader
from shards import ConvertOptions, convert
from training.config import RunConfig, TrainError, validate
from training.dist import World
from training.knn import knn_predict, knn_top1
from training.optim import StepPlan, build_optimizer
from training.tasks.dino import (
    DinoTask,
    cosine,
    dino_loss,
    epochs_done,
    knn_data,
    koleo_loss,
    teacher_temp,
    updated_center,
)

CPU = torch.device("cpu")
ONE = World(0, 0, 1, CPU)


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def test_dino_loss_equals_the_written_out_cross_entropy():
    g = torch.Generator().manual_seed(0)
    batch, crops, dim = 2, 3, 4  # 2 global views + 1 local
    student = torch.randn(crops * batch, dim, generator=g)
    teacher = torch.randn(2 * batch, dim, generator=g)
    center = torch.randn(1, dim, generator=g)
    ts, tt = 0.1, 0.04

    pair_means = []
    for i in range(2):  # the teacher's global view
        for v in range(crops):  # the student's view
            if v == i:
                continue  # identical views are never paired
            per_sample = []
            for b in range(batch):
                q = softmax([(teacher[i * batch + b, k] - center[0, k]).item() / tt for k in range(dim)])
                p = softmax([student[v * batch + b, k].item() / ts for k in range(dim)])
                per_sample.append(-sum(q[k] * math.log(p[k]) for k in range(dim)))
            pair_means.append(sum(per_sample) / batch)
    expected = sum(pair_means) / len(pair_means)  # 4 pairs: (0,1) (0,2) (1,0) (1,2)

    got = dino_loss(student, teacher, center, crops, ts, tt)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_and_its_gradients_equal_the_mean_over_pairs_at_the_recipes_crop_count():
    g = torch.Generator().manual_seed(1)
    batch, crops, dim = 8, 12, 256  # 2 global views + 10 local, as shipped
    student = torch.randn(crops * batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * batch, dim, generator=g, dtype=torch.float64)
    center = torch.randn(1, dim, generator=g, dtype=torch.float64)
    log_p = (student / 0.1).log_softmax(-1).chunk(crops)
    q = ((teacher - center) / 0.04).softmax(-1).chunk(2)
    expected = torch.stack([(-q[i] * log_p[v]).sum(-1).mean() for i in range(2) for v in range(crops) if v != i]).mean()
    (expected_grad,) = torch.autograd.grad(expected, student)

    got = dino_loss(student, teacher, center, crops, 0.1, 0.04)
    (grad,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)  # dino_loss computes in float32


def test_center_is_an_ema_of_the_mean_teacher_output():
    center = torch.tensor([[1.0, -2.0]])
    teacher = torch.tensor([[1.0, 1.0], [3.0, 5.0]])  # mean (2, 3)
    new = updated_center(center, teacher, 0.9, ONE)
    assert new[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 2, 0.9 * -2 + 0.1 * 3])


def test_koleo_on_three_points():
    # (1,0) and (-1,0) both have (0,1) as nearest neighbour; (0,1) is as close to both: distance sqrt(2) each
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    bunched = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [1.0, 0.3]])
    assert koleo_loss(spread) < koleo_loss(bunched)  # it rewards spreading the features


def test_schedules():
    assert cosine(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert cosine(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    assert cosine(0.04, 0.4, 100, 100) == pytest.approx(0.4)
    ramp = StepPlan(batches_per_epoch=8, accum_steps=2, batch_ramp=1, epochs=3, max_steps=None)  # 8, 4, 4 steps
    assert [epochs_done(ramp, s) for s in (0, 4, 8, 10, 16)] == [0, 0.5, 1, 1.5, 3]
    cfg = config("unused", dino={"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 2})
    assert [teacher_temp(cfg.dino, e) for e in (0, 1, 2, 5)] == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_knn_votes_are_weighted_by_similarity():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]))
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]))
    assert knn_predict(bank, labels, queries, 2, k=2, temperature=0.07).tolist() == [0, 1]
    # k=5 sees three votes for 1 and two for 0; for a query next to the 0s, weights exp(sim/T) decide
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.02]]))
    assert knn_predict(bank, labels, query, 2, k=5, temperature=0.07).tolist() == [0]
    assert knn_predict(bank, labels, query, 2, k=5, temperature=100.0).tolist() == [1]  # ~equal weights: majority


# ---- on a real store -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(imagefolder_src, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("dino-store") / "store"
    convert(ConvertOptions(src=str(imagefolder_src), dest=str(dest), format="wds"), progress=False)
    return str(dest)


def config(store: str, **sections) -> RunConfig:
    raw = {
        "name": "dino", "task": "dino", "seed": 1,
        "data": {"path": store, "image_size": 32, "batch_size": 8, "workers": 0, "pin_memory": False,
                 "channels_last": False, "augment": {"local_crops": 2, "local_size": 16}},
        "model": {"name": "vit_tiny_patch16_224",
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "dynamic_img_size": True}},
        "optim": {"lr": 1e-3, "weight_decay": 0.04},
        "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        **sections,
    }
    return validate(raw)


def test_one_step_teacher_follows_the_ema_of_the_student(store):
    torch.manual_seed(0)
    cfg = config(store)
    task = DinoTask(cfg, [], ONE, Path("unused"))
    model = task.build_model()
    optimizer = build_optimizer(cfg.optim, model, cfg.optim.lr)
    loader = build_loader(cfg.data, "train", train=True, task="dino", rank=0, world_size=1, seed=1, device=CPU)
    plan = StepPlan(len(loader), 1, 0, 2, None)
    task.start(optimizer, plan, 0)
    batch = next(iter(loader))
    assert [tuple(c.shape) for c in batch["crops"]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2

    teacher_before = {k: v.clone() for k, v in model.teacher.module.state_dict().items()}
    assert all(torch.equal(v, model.student.state_dict()[k]) for k, v in teacher_before.items())  # a copy at start
    prototypes_before = model.student.head.last_layer.parametrizations.weight.original1.clone()

    loss = task.train_loss(model, batch)  # the loop's order: loss, backward, hooks around the optimizer step
    assert torch.isfinite(loss)
    loss.backward()
    task.before_step(model, 0)
    optimizer.step()
    task.after_step(model, 1)

    m = cosine(0.996, 1.0, 0, plan.total_steps)
    assert m == pytest.approx(0.996)
    student = model.student.state_dict()
    changed = 0
    for key, old in teacher_before.items():
        expected = m * old + (1 - m) * student[key]
        assert torch.allclose(model.teacher.module.state_dict()[key], expected, atol=1e-7), key
        changed += not torch.equal(student[key], old)
    assert changed > 10  # the student moved, so the teacher now differs from it
    assert not torch.equal(model.teacher.module.state_dict()["backbone.cls_token"], student["backbone.cls_token"])
    # the first epoch leaves the prototypes as they were (no gradient, no weight decay)
    assert torch.equal(model.student.head.last_layer.parametrizations.weight.original1, prototypes_before)
    assert model.center.abs().sum() > 0  # the center moved towards the teacher's outputs
    model.train()
    assert model.student.training and not any(m.training for m in model.teacher.module.modules())
    # the weight decay follows its cosine: wd(1) for the next step, on the decayed groups only
    wds = sorted({g["weight_decay"] for g in optimizer.param_groups})
    assert wds == pytest.approx([0.0, cosine(0.04, 0.4, 1, plan.total_steps)])


def test_a_night_runs_the_teacher_momentum_and_weight_decay_cosines_again_with_its_lr(store):
    """With optim.schedule_start_epoch (the nightly flow sets it each night), DINO's momentum and weight-decay
    cosines span the night's steps, as its lr does: night 2's first step moves the teacher at 0.996 again. Before,
    they spanned all nights, so night 2's steps took the last half of them (0.998 on), night n's the last 1/n."""
    torch.manual_seed(0)
    cfg = config(store, optim={"lr": 1e-3, "weight_decay": 0.04, "schedule_start_epoch": 1}, train={"epochs": 2})
    task = DinoTask(cfg, [], ONE, Path("unused"))
    model = task.build_model()
    optimizer = build_optimizer(cfg.optim, model, cfg.optim.lr)
    loader = build_loader(cfg.data, "train", train=True, task="dino", rank=0, world_size=1, seed=1, device=CPU)
    plan = StepPlan(len(loader), 1, 0, 2, None)
    night = plan.steps_in(1)
    task.start(optimizer, plan, plan.steps_in(0))  # night 2 begins: night 1's steps done
    assert sorted({g["weight_decay"] for g in optimizer.param_groups}) == pytest.approx([0.0, 0.04])

    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)  # the student moved away from its teacher copy
    teacher_before = {k: v.clone() for k, v in model.teacher.module.state_dict().items()}
    task.after_step(model, plan.steps_in(0) + 1)  # the night's first optimizer step
    student = model.student.state_dict()
    for key, old in teacher_before.items():
        assert torch.allclose(model.teacher.module.state_dict()[key], 0.996 * old + 0.004 * student[key]), key
    wds = sorted({g["weight_decay"] for g in optimizer.param_groups})
    assert wds == pytest.approx([0.0, cosine(0.04, 0.4, 1, night)])
    task.after_step(model, plan.total_steps)  # the night's last step ends both cosines
    assert sorted({g["weight_decay"] for g in optimizer.param_groups}) == pytest.approx([0.0, 0.4])


def test_a_training_step_reads_nothing_back_from_the_device(store):
    """On the meta device any read of a device value raises (.item(), a tensor in an `if`, a boolean-mask index):
    the loss, the centre, KoLeo, clipping, the optimizer, the frozen prototypes, the teacher's EMA and the schedules
    queue their work without waiting for the GPU, step after step (issue 18)."""
    cfg = config(store, optim={"lr": 1e-3, "weight_decay": 0.04, "clip_grad": 3.0},
                 dino={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "koleo_weight": 0.1})
    task = DinoTask(cfg, [], ONE, Path("unused"))
    model = task.build_model().to("meta")
    optimizer = build_optimizer(cfg.optim, model, cfg.optim.lr)
    task.start(optimizer, StepPlan(10, 1, 0, 2, None), 0)
    crops = [torch.empty(8, 3, 32, 32, device="meta")] * 2 + [torch.empty(8, 3, 16, 16, device="meta")] * 2
    for step in range(2):  # the first epoch's frozen prototypes, then a step with them
        loss = task.train_loss(model, {"crops": crops})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        task.before_step(model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task.after_step(model, step + 1)
    assert loss.device.type == "meta" and model.center.device.type == "meta"


def test_knn_eval_needs_a_labeled_store(store, unlabeled_src, tmp_path):
    unlabeled = str(tmp_path / "u")
    convert(ConvertOptions(src=str(unlabeled_src), dest=unlabeled, format="wds"), progress=False)
    with pytest.raises(TrainError, match=r"data.path \(no eval.knn_path set\): .*labeled \(imagefolder\) store"):
        knn_data(config(unlabeled))
    assert knn_data(config(unlabeled, eval={"knn_path": store})).path == store
    with pytest.raises(TrainError, match="eval.knn_path: .*layout unlabeled"):
        knn_data(config(store, eval={"knn_path": unlabeled}))
    with pytest.raises(TrainError, match="train.ema_decay"):
        DinoTask(config(store, train={"ema_decay": 0.99}), [], ONE, tmp_path)


class Backbone(torch.nn.Sequential):
    """A sequence of layers with a timm model's `num_features`, which the k-NN reads."""

    num_features: int


def knn_answer(store: str, rank: int, world: World) -> float:
    """k-NN top-1 of fixed random features (pooled colours) on this rank's share of the store."""
    cfg = config(store)
    bank, queries = (build_loader(cfg.data, split, train=False, task="classify", rank=rank, world_size=world.size,
                                  seed=0, device=CPU) for split in ("train", "val"))
    torch.manual_seed(0)
    backbone = Backbone(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    backbone.num_features = 16
    return knn_top1(backbone, bank, queries, world, len(queries.classes), k=5)


def knn_on_rank(rank: int, port: int, store: str, out: str) -> None:
    """One rank of a 2-process gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(knn_answer(store, rank, World(rank, rank, 2, CPU)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_knn_top1_over_two_ranks_equals_one_process(store, tmp_path):
    """Each rank extracts its share; the gathered bank and summed hits give the single-process answer."""
    alone = knn_answer(store, 0, ONE)
    assert 100 / 6 < alone <= 100  # pooled colours of crops from 6 photos: better than chance
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "top1")
    mp.spawn(knn_on_rank, args=(port, store, out), nprocs=2)
    assert [torch.load(f"{out}.{r}") for r in range(2)] == [alone, alone]
