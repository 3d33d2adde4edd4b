"""The run config: pydantic models for the whole YAML, dotted overrides, one-line errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines import DataConfig


class TrainError(Exception):
    """A user-facing problem (config, weights, storage): the message is one line, shown as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = "resnet50"  # any timm model name
    pretrained: str | None = None  # local path or fsspec URL of weights; never a hub download
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    grad_checkpointing: bool = False
    kwargs: dict[str, Any] = {}  # passed to timm.create_model (e.g. img_size for ViTs)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _no_hub(cls, v: Any) -> Any:
        if isinstance(v, bool):
            if v:
                raise ValueError("weights are never downloaded from a hub: pass model.pretrained=PATH (a local path or URL)")
            return None
        return v


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


class EvalConfig(_Section):
    metric: Literal["val_top1", "val_top5", "ema_val_top1", "ema_val_top5"] = "val_top1"
    every_epochs: int = Field(1, ge=1)


class RunConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    runs_dir: str = "runs"
    task: Literal["classify", "dino", "detect"] = "classify"
    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: str = "auto"  # auto | never | a checkpoint path or URL
    eval: EvalConfig = EvalConfig()


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
    return f"bad value for {key}: {msg} (got {err.get('input')!r}){more}"


def to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain YAML/JSON-safe values."""
    return cfg.model_dump(mode="json")
