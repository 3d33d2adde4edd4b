"""The run config: pydantic models for the whole YAML, dotted overrides, one-line errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines import DataConfig
from training.tasks import TASKS


class TrainError(Exception):
    """A user-facing problem (config, weights, storage): the message is one line, shown as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = "resnet50"  # any timm model name
    # true: timm's weights for `name` through the Hugging Face cache (HF_HOME); or a local path or fsspec URL
    pretrained: bool | str | None = None
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    grad_checkpointing: bool = False
    kwargs: dict[str, Any] = {}  # passed to timm.create_model (e.g. img_size for ViTs)

    @field_validator("pretrained")
    @classmethod
    def _false_is_none(cls, v: bool | str | None) -> bool | str | None:
        return v or None


class OptimConfig(_Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1.0e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    lr_base_batch: int | None = Field(None, gt=0)  # lr * global_batch / lr_base_batch when set
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    layer_decay: float | None = Field(None, gt=0, le=1)
    clip_grad: float | None = Field(None, gt=0)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    compile: bool = False
    accum_steps: int = Field(1, ge=1)
    # Batch-size ramp-up by accumulation: epoch e (0-based) accumulates
    # ceil(accum_steps * (e + 1) / (batch_ramp + 1)) micro-batches, reaching accum_steps at epoch batch_ramp.
    batch_ramp: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup: float = Field(0.0, ge=0)  # mixup alpha (timm.data.Mixup); 0 = off
    cutmix: float = Field(0.0, ge=0)  # cutmix alpha; 0 = off
    ema_decay: float | None = Field(None, gt=0, lt=1)
    log_every: int = Field(10, ge=1)
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-exact resume


class CheckpointConfig(_Section):
    every_steps: int = Field(500, ge=1)
    keep: int = Field(3, ge=1)  # step checkpoints kept, locally and in storage
    storage: str | None = None  # s3://bucket/prefix or a NAS path; null = local only
    upload_timeout: float = Field(600.0, ge=0)  # seconds the run waits for uploads at its end
    preempt_timeout: float = Field(60.0, ge=0)  # seconds a preempted run waits for its last upload


class DetectConfig(_Section):
    """task: detect: a torchvision detector on the timm `model.name` backbone (features_only) with an FPN."""

    head: Literal["fcos", "retinanet"] = "fcos"
    out_indices: tuple[int, ...] = (2, 3, 4)  # timm feature levels into the FPN (strides 8, 16, 32 on a resnet)
    p6p7: bool = True  # two more FPN levels (strides x2, x4) from the last one, as FCOS/RetinaNet do
    fpn_channels: int = Field(256, ge=32, multiple_of=32)
    head_convs: int = Field(4, ge=1)  # FCOS head depth
    score_thresh: float = Field(0.05, ge=0, le=1)  # detections kept for evaluation (COCO mAP wants a low one)
    nms_thresh: float = Field(0.6, gt=0, le=1)  # IoU above which NMS drops the lower-scored box
    detections_per_img: int = Field(100, ge=1)
    topk_candidates: int = Field(1000, ge=1)  # per level, before NMS
    predict_score_thresh: float = Field(0.25, ge=0, le=1)  # `shardtrain predict`'s default --conf


class DinoConfig(_Section):
    """task: dino (Caron et al. 2021); defaults are DINO's ViT-S/16 recipe."""

    out_dim: int = Field(65536, ge=1)  # prototypes (the head's output)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    norm_last_layer: bool = True  # prototypes kept unit-norm (weight-norm magnitude frozen at 1)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.04, gt=0)  # after the warm-up
    warmup_teacher_temp: float = Field(0.04, gt=0)  # linear to teacher_temp over warmup_teacher_temp_epochs
    warmup_teacher_temp_epochs: float = Field(0.0, ge=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    momentum_teacher: float = Field(0.996, ge=0, le=1)  # teacher EMA momentum, to 1 along a cosine
    weight_decay_end: float | None = Field(0.4, ge=0)  # optim.weight_decay to this along a cosine; null = constant
    freeze_last_layer: float = Field(1.0, ge=0)  # epochs the prototype layer is not updated
    koleo_weight: float = Field(0.0, ge=0)  # DINOv2's KoLeo regulariser on the student's global features; 0 = off


class EvalConfig(_Section):
    metric: str = "val_top1"  # val_<m> or ema_val_<m> for a metric m of the task; default val_<its first>
    every_epochs: int = Field(1, ge=1)
    knn_path: str | None = None  # dino: the labeled store of the k-NN eval; null = data.path
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)


class RunConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    runs_dir: str = "runs"
    task: str = "classify"  # a name in training.tasks.TASKS
    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: str = "auto"  # auto | never | a checkpoint path or URL
    eval: EvalConfig = EvalConfig()
    # Settings of one task, present only in its runs (filled with the defaults there; refused elsewhere).
    detect: DetectConfig | None = None
    dino: DinoConfig | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"no task {v!r}; tasks: {', '.join(TASKS)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _own_section(cls, raw: Any) -> Any:
        """The run's task gets its section, with the defaults where the YAML has none."""
        info = TASKS.get(raw.get("task", "classify")) if isinstance(raw, dict) else None
        if info is not None and info.section is not None and raw.get(info.section) is None:
            return {**raw, info.section: {}}
        return raw

    @model_validator(mode="after")
    def _no_other_sections(self) -> RunConfig:
        for name, info in TASKS.items():
            if info.section is not None and name != self.task and getattr(self, info.section) is not None:
                raise ValueError(f"the {info.section}: section is for task {name}; this run's task is {self.task}")
        return self

    @model_validator(mode="after")
    def _task_metric(self) -> RunConfig:
        metrics = TASKS[self.task].metrics
        if "metric" not in self.eval.model_fields_set:
            self.eval = self.eval.model_copy(update={"metric": f"val_{metrics[0]}"})
        allowed = [f"{prefix}{m}" for prefix in ("val_", "ema_val_") for m in metrics]
        if self.eval.metric not in allowed:
            raise ValueError(f"eval.metric: task {self.task} reports {', '.join(allowed)}, not {self.eval.metric}")
        if self.eval.metric.startswith("ema_") and not self.train.ema_decay:
            raise ValueError(f"eval.metric {self.eval.metric} needs train.ema_decay (no EMA model otherwise)")
        return self


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.name


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read the YAML at `path`, apply dotted `key.sub=value` overrides, validate."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise TrainError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TrainError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise TrainError(f"config {path} must be a mapping of keys to values")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as YAML (numbers, bools, null, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise TrainError(f"override {item!r} must look like key.sub=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainError(f"override {item!r}: {part} is not a section")
        node = child
    node[leaf] = yaml.safe_load(value) if value else None


def validate(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise TrainError(format_error(e)) from None


def format_error(e: pydantic.ValidationError) -> str:
    """One line per config: the first problem, named by its dotted key."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown config key {key}"
    if err["type"] == "missing":
        return f"missing config key {key}"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    if not err["loc"]:  # a check across keys: its message names them
        return f"bad config: {msg}{more}"
    return f"bad value for {key}: {msg} (got {err.get('input')!r}){more}"


def to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain YAML/JSON-safe values."""
    return cfg.model_dump(mode="json")
