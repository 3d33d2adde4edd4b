"""Run config, overrides and their one-line errors; the step plan and LR scaling; checkpoint files and
storage markers (real moto S3); weights from a path. All in-process and quick, except one CLI call."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from training import CheckpointRef, TrainError, checkpoint, latest_checkpoint, load_config, run_dir, storage
from training.config import ModelConfig, OptimConfig, TrainConfig, to_dict
from training.model import build_model
from training.optim import StepPlan, build_optimizer, build_scheduler, current_lr, scaled_lr
from training.train import set_algorithms

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, **cfg) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "runs_dir": str(tmp_path / "runs"), "data": {"path": "x"}, **cfg}))
    return path


def test_shipped_configs_load():
    for name in ("demo", "resnet50", "deit_small", "deit_small_finetune", "detector", "dino_vits16"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.name == name
    deit = load_config(REPO / "configs" / "deit_small.yaml")
    assert (deit.optim.layer_decay, deit.train.mixup, deit.train.cutmix, deit.train.label_smoothing) == (
        None, 0.8, 1.0, 0.1)  # from scratch: no layer decay, as DeiT
    finetune = load_config(REPO / "configs" / "deit_small_finetune.yaml")
    assert (finetune.model.name, finetune.model.pretrained) == ("deit_small_patch16_224.fb_in1k", True)
    assert (finetune.optim.layer_decay, finetune.model.drop_path, finetune.train.label_smoothing,
            finetune.train.mixup, finetune.train.cutmix, finetune.optim.warmup_epochs) == (0.65, 0.1, 0.1, 0.8, 1.0, 2)
    assert load_config(REPO / "configs" / "detector.yaml").model.pretrained is True


def test_overrides_are_dotted_and_parsed_as_yaml(tmp_path):
    cfg = load_config(write(tmp_path), ["train.max_steps=20", "optim.lr=1e-4", "checkpoint.storage=s3://b/p",
                                        "model.kwargs={img_size: 32}", "train.ema_decay=null"])
    assert cfg.train.max_steps == 20 and cfg.optim.lr == 1e-4 and cfg.checkpoint.storage == "s3://b/p"
    assert cfg.model.kwargs == {"img_size": 32} and cfg.train.ema_decay is None
    assert load_config(write(tmp_path), ["optim.lr=1"]).optim.lr == 1.0  # an int where a float goes is fine
    assert run_dir(cfg) == tmp_path / "runs" / "t"
    # YAML reads a bare off as false: the one setting that spells a choice "off" takes it either way
    assert load_config(write(tmp_path), ["train.amp=off"]).train.amp == "off"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.bogus=1"], "unknown config key train.bogus"),
        (["data.batchsize=4"], "unknown config key data.batchsize (did you mean data.batch_size?)"),
        (["data.augment.hflipp=0"], "unknown config key data.augment.hflipp (did you mean data.augment.hflip?)"),
        (["nmae=x"], "unknown config key nmae (did you mean name?)"),
        (["optim.lr=-1"], "bad value for optim.lr: Input should be greater than 0 (got -1)"),
        (["train.amp=fp8"], "bad value for train.amp"),
        (["data.batch_size=many"], "bad value for data.batch_size"),
        (["data.workers=-1"], "bad value for data.workers: expected a whole number >= 0 or auto (got -1)"),
        (["data.workers=many"], "bad value for data.workers: expected a whole number >= 0 or auto (got 'many')"),
        (["data.image_size=0"], "bad value for data.image_size"),
        (["data.augment.scale=[0.9, 0.1]"],
         "bad value for data.augment.scale: a range [low, high] needs low <= high (got [0.9, 0.1])"),
        (["data.augment.std=[0.2, 0, 0.2]"], "bad value for data.augment.std.1: Input should be greater than 0"),
        (["data.augment.mean=[0.5, 0.5]"], "bad value for data.augment.mean: 3 values, not 2 (got [0.5, 0.5])"),
        (["data.augment.mean=[0.5]"], "bad value for data.augment.mean: 3 values, not 1 (got [0.5])"),
        # YAML's true and false are no numbers, though pydantic takes them as 1 and 0 (optim.lr=true was 1.0)
        (["train.label_smoothing=true"], "bad value for train.label_smoothing: a number in [0, 1) (got true)"),
        (["optim.lr=true"], "bad value for optim.lr: a number > 0 (got true)"),
        (["train.mixup=off"], "bad value for train.mixup: a number >= 0 (got false)"),
        (["train.ema_decay=true"], "bad value for train.ema_decay: a number in (0, 1), or null (got true)"),
        (["data.batch_size=true"], "bad value for data.batch_size: a whole number >= 1 (got true)"),
        (["data.augment.mean=[true, 0.5, 0.5]"],
         "bad value for data.augment.mean: a list of 3 numbers (got [true, 0.5, 0.5])"),
        (["name=a/b"], "bad value for name"),
        (["eval.metric=ema_val_top1"], "bad config: eval.metric ema_val_top1 needs train.ema_decay"),
        # before, ignored in silence: only dino's k-NN evaluation reads them
        (["eval.knn_path=stores/labeled"],
         "bad config: eval.knn_path is for task dino (its k-NN evaluation); this run's task is classify"),
        (["task=detect", "eval.knn_k=5"],
         "bad config: eval.knn_k is for task dino (its k-NN evaluation); this run's task is detect"),
        (["train.epochs=3", "optim.schedule_start_epoch=3"],
         "bad config: optim.schedule_start_epoch 3 must be below train.epochs 3: the lr schedule would have no epochs"),
        (["optim.schedule_start_epoch=-1"], "bad value for optim.schedule_start_epoch: Input should be greater than"),
        (["train=3"], "bad value for train"),
        (["max_steps"], "override 'max_steps' must look like key.sub=value"),
        # before, each a traceback in the first step (or in building the FPN)
        (["model.kwargs={in_chans: 1}"], "bad value for model.kwargs: the data pipeline gives the model RGB images "
                                         "(3 channels), so in_chans must be 3 (got 1)"),
        (["task=detect", "detect.out_indices=[]"], "bad value for detect.out_indices: one or more feature levels >= "
                                                   "0, in increasing order, each once (got [])"),
        (["task=detect", "detect.out_indices=[2, 2, 3]"],
         "bad value for detect.out_indices: one or more feature levels >= 0, in increasing order, each once (got [2, "
         "2, 3])"),
        (["task=detect", "detect.out_indices=[4, 3, 2]"], "bad value for detect.out_indices"),
        # before, written to the local folder ./s3:/ without a word
        (["checkpoint.storage=s3://"], "bad value for checkpoint.storage: s3:// names no bucket or folder after s3://"),
        # before, PyYAML's traceback
        (["data.batch_size=[1"], "override 'data.batch_size=[1': the value is not valid YAML (line 1, column 3: "
                                 "expected ',' or ']'"),
        (["name=@x"], "override 'name=@x': the value is not valid YAML (line 1, column 1: found character '@' that "
                      "cannot start any token); a string that YAML reads otherwise goes in quotes: name='\"...\"'"),
        (["train.compile=true", "train.compile_mode=reduce-overhead", "train.accum_steps=2"],
         "bad config: train.compile_mode=reduce-overhead runs CUDA graphs, which do not accumulate gradients"),
        (["task=detect", "train.compile=true", "train.compile_mode=max-autotune"],
         "bad config: train.compile_mode=max-autotune: detection compiles its backbone and head apart"),
    ],
)
def test_bad_key_or_value_is_one_line_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(TrainError) as err:
        load_config(write(tmp_path), overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    """Before, a UnicodeDecodeError traceback from train, predict and export."""
    path = write(tmp_path)
    path.write_bytes(path.read_bytes() + "# données de test\n".encode("latin-1"))
    with pytest.raises(TrainError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config {path} is not UTF-8 text: byte 0xe9 at offset ")
    assert str(err.value).endswith("; save it as UTF-8")


def test_knn_settings_at_their_defaults_load_in_any_task(tmp_path):
    """A run dir's config.yaml is resolved: it holds eval.knn_k and the rest at their defaults, whatever the task."""
    resolved = tmp_path / "config.yaml"
    resolved.write_text(yaml.safe_dump(to_dict(load_config(write(tmp_path), ["task=detect"]))))
    assert load_config(resolved).eval.knn_k == 20
    assert load_config(write(tmp_path), ["task=dino", "eval.knn_path=s", "eval.knn_k=5"]).eval.knn_path == "s"


def test_compile_modes_without_cuda_graphs_accumulate_and_compile_detection(tmp_path):
    for mode in ("default", "max-autotune-no-cudagraphs"):
        cfg = load_config(write(tmp_path), ["train.compile=true", f"train.compile_mode={mode}", "train.accum_steps=2"])
        assert (cfg.train.compile_mode, cfg.train.accum_steps) == (mode, 2)
        assert load_config(write(tmp_path), ["task=detect", "train.compile=true", f"train.compile_mode={mode}"])


def test_missing_data_section_and_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\n")
    with pytest.raises(TrainError, match="^missing config key data$"):
        load_config(path)
    path.write_text("name: [t\n")
    with pytest.raises(TrainError, match="is not valid YAML"):
        load_config(path)
    path.write_text("name: t\ndata:\n  path: s\n   batch_size: 8\n")  # one space too many: says where
    with pytest.raises(TrainError) as err:
        load_config(path)
    assert str(err.value) == f"config {path} is not valid YAML: line 4, column 14: mapping values are not allowed here"


def test_cli_prints_error_line_and_exits_2(tmp_path):
    shardtrain = Path(sys.executable).with_name("shardtrain")
    proc = subprocess.run([str(shardtrain), "train", str(write(tmp_path)), "train.epochs=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "error: bad value for train.epochs: Input should be greater than or equal to 1 (got 0)"
    )
    assert "Traceback" not in proc.stdout + proc.stderr


def test_lr_scales_with_global_batch():
    assert scaled_lr(OptimConfig(lr=5e-4, lr_base_batch=512), 1024) == pytest.approx(1e-3)
    assert scaled_lr(OptimConfig(lr=5e-4), 1024) == 5e-4


def test_step_plan_accumulation_ramp():
    plan = StepPlan(batches_per_epoch=10, accum_steps=4, batch_ramp=3, epochs=6, max_steps=None)
    assert [plan.accum(e) for e in range(6)] == [1, 2, 3, 4, 4, 4]
    assert [plan.steps_in(e) for e in range(6)] == [10, 5, 4, 3, 3, 3]  # a short last group still steps
    assert plan.total_steps == 28
    assert StepPlan(10, 4, 3, 6, max_steps=7).total_steps == 7


def test_the_schedule_counts_the_steps_to_the_data_s_position():
    # 2 processes: 6 batches a rank, 3 steps an epoch (accum 2); 1 process: 12 batches, 6 steps. Epoch 2 half done.
    two, one = StepPlan(6, 2, 0, 2, None), StepPlan(12, 2, 0, 2, None)
    assert two.step_at(1, 3) == 4  # a group begun is not yet a step
    assert one.step_at(1, 6) == 9 and one.steps_left(4, 1, 6) == 3  # 4 steps done on 2 processes: 3 left on 1
    assert one.step_at(2, 0) == one.step_at(1, 12) == one.total_steps == 12
    capped = StepPlan(12, 2, 0, 2, max_steps=8)  # max_steps caps the steps done
    assert capped.by_steps and capped.steps_left(6, 0, 4) == 2 and not StepPlan(12, 2, 0, 2, max_steps=12).by_steps
    assert capped.epochs_run == 2 and capped.epochs_from(6, 0, 4) == 1  # 6 steps done, 2 left: within epoch 1


def test_the_logged_lr_under_layer_decay_is_the_schedule_s_not_the_most_decayed_layer_s(tmp_path):
    # before, the log, results.csv and TensorBoard showed param_groups[0]'s: the patch embedding's, 0.65^depth of it
    cfg = load_config(write(tmp_path), ["model.name=test_vit", "optim.layer_decay=0.65", "optim.warmup_epochs=0",
                                        "optim.lr=1e-3"])
    model = build_model(cfg.model, num_classes=3, cache_dir=tmp_path)
    optimizer = build_optimizer(cfg.optim, model, cfg.optim.lr)
    scheduler = build_scheduler(cfg.optim, optimizer, StepPlan(10, 1, 0, 2, None))
    scheduler.step_update(0)
    lrs = sorted({group["lr"] for group in optimizer.param_groups})
    assert len(lrs) > 2 and lrs[0] < 0.5 * lrs[-1]
    assert current_lr(optimizer) == lrs[-1] == pytest.approx(1e-3)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = tmp_path / "c.pt"
    checkpoint.atomic_save({"rng": checkpoint.rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_local_checkpoints_keep_last_k_and_latest(tmp_path):
    cfg = load_config(write(tmp_path))
    ckpt_dir = run_dir(cfg) / "checkpoints"
    assert latest_checkpoint(cfg) is None
    for step in (2, 4, 6):
        plan = {"train": {"epochs": 3}, "optim": {"schedule_start_epoch": 0}}
        checkpoint.save(ckpt_dir, {"step": step, "epoch": step // 4, "model": {}, "config": plan}, keep=2)
    (ckpt_dir / checkpoint.step_name(8)).write_bytes(b"partial")  # no marker: never counts
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == [f"step_0000000{s}.pt" for s in (4, 6, 8)]
    assert latest_checkpoint(cfg) == CheckpointRef(str(ckpt_dir / "step_00000006.pt"), step=6, epoch=1, epochs=3,
                                                   schedule_start_epoch=0)  # the marker holds the run's plan
    assert checkpoint.load(ckpt_dir / "last.pt")["step"] == 6


def test_remote_partial_never_loaded(tmp_path, s3_bucket):
    """Storage: only files with a marker count, and the marker's sha256 must match the bytes."""
    cfg = load_config(write(tmp_path), [f"checkpoint.storage={s3_bucket}/p"])
    local = tmp_path / "step_00000004.pt"
    checkpoint.atomic_save({"step": 4, "epoch": 0}, local)
    fs, root = storage.filesystem(f"{s3_bucket}/p/t/checkpoints")
    storage.upload(fs, local, f"{root}/step_00000004.pt", {"step": 4, "epoch": 0})
    fs.pipe_file(f"{root}/step_00000009.pt", b"half an upload")  # newer, but no marker
    latest = latest_checkpoint(cfg)
    assert (latest.step, latest.remote) == (4, True)

    fs.pipe_file(f"{root}/step_00000004.pt", b"overwritten")  # bytes no longer match the marker
    with pytest.raises(TrainError, match="does not match its marker's sha256"):
        storage.download(latest.path, tmp_path / "dl.pt", latest.sha256)
    assert not (tmp_path / "dl.pt").exists()


def test_resume_from_a_url_needs_its_marker(tmp_path, s3_bucket):
    from training import resume

    local = tmp_path / "c.pt"
    checkpoint.atomic_save({"step": 7, "epoch": 1}, local)
    fs, root = storage.filesystem(f"{s3_bucket}/old")
    storage.upload(fs, local, f"{root}/step_00000007.pt", {"step": 7, "epoch": 1})
    fs.pipe_file(f"{root}/step_00000009.pt", b"no marker")
    cfg = load_config(write(tmp_path), [f"resume={s3_bucket}/old/step_00000007.pt"])
    fetched = resume.fetch(cfg)
    assert fetched.parent == run_dir(cfg) / "checkpoints" and checkpoint.load(fetched)["step"] == 7
    cfg = load_config(write(tmp_path), [f"resume={s3_bucket}/old/step_00000009.pt"])
    with pytest.raises(TrainError, match="has no .complete marker"):
        resume.fetch(cfg)
    cfg = load_config(write(tmp_path), [f"resume={tmp_path / 'nope.pt'}"])
    with pytest.raises(TrainError, match="bad value for resume: no checkpoint file"):
        resume.fetch(cfg)


def test_uploader_retries_until_storage_is_back(tmp_path):
    """A NAS path that is missing (unmounted) at first: the upload is retried and lands when it appears."""
    nas_parent = tmp_path / "mnt"
    local = tmp_path / "step_00000002.pt"
    local.write_bytes(b"x" * 1000)
    nas_parent.write_text("not a directory yet")  # makedirs under a file fails like an absent mount
    logs: list[str] = []
    up = storage.Uploader(str(nas_parent / "nas"), "t", log=logs.append)
    up.submit(local, "checkpoints/step_00000002.pt", {"step": 2, "epoch": 0}, keep=2)
    assert not up.wait(1.5)
    assert any("retrying" in line for line in logs)
    nas_parent.unlink()
    assert up.wait(30)
    up.close()
    marker = json.loads((nas_parent / "nas" / "t" / "checkpoints" / "step_00000002.pt.complete").read_text())
    assert marker["step"] == 2 and marker["bytes"] == 1000


def test_pretrained_weights_from_a_path(tmp_path):
    source = build_model(ModelConfig(name="test_resnet"), num_classes=10, cache_dir=tmp_path)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_model(ModelConfig(name="test_resnet", pretrained=str(tmp_path / "w.pth")), 3, tmp_path)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.get_classifier().out_features == 3  # the head is new: the store has 3 classes
    with pytest.raises(TrainError, match="model.pretrained: no such file"):
        build_model(ModelConfig(name="test_resnet", pretrained=str(tmp_path / "nope.pth")), 3, tmp_path)
    with pytest.raises(TrainError, match="no timm model named 'resnet_nope'"):
        build_model(ModelConfig(name="resnet_nope"), 3, tmp_path)


@pytest.mark.parametrize(("deterministic", "benchmark", "expected"),
                         [(False, True, True), (False, False, False), (True, True, False)])
def test_cudnn_benchmarks_its_convolutions_unless_told_not_to_or_deterministic(deterministic, benchmark, expected):
    before = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    try:
        set_algorithms(TrainConfig(deterministic=deterministic, cudnn_benchmark=benchmark))
        assert torch.backends.cudnn.benchmark is expected
        assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1])
