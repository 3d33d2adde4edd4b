"""The run config: pydantic models for the whole YAML, dotted overrides, one-line errors."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import pydantic
import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from pipelines import DataConfig, Section
from shards.layouts import yaml_problem
from shards.storage import url_problem
from training.tasks import TASKS

Step = Annotated[int, Field(ge=1)]  # an optimizer step's number, counted from 1


class TrainError(Exception):
    """A user-facing problem (config, weights, storage): the message is one line, shown as is."""


class ModelConfig(Section):
    name: str = Field(
        default="resnet50", description="Any timm model name, with a pretrained tag if you like "
        "(`deit_small_patch16_224.fb_in1k`), or `hf-hub:org/repo`.")
    pretrained: bool | str | None = Field(
        default=None, description="`true`: timm's weights for `model.name` through the Hugging Face cache "
        "(`HF_HOME`), fetched once before torchrun starts; or a local path or fsspec URL of weights; null (or "
        "false): random weights. The classifier head is new, sized to the store's classes.")
    drop_path: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Stochastic depth rate (timm's `drop_path_rate`).")
    drop_rate: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout rate before the classifier (timm's `drop_rate`).")
    grad_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass (timm's `set_grad_checkpointing`): "
        "less memory, more compute.")
    kwargs: dict[str, Any] = Field(
        default={}, description="More arguments to `timm.create_model`, e.g. `{img_size: 32}`, or "
        "`{dynamic_img_size: true}` for a ViT in a dino run.")

    @field_validator("pretrained")
    @classmethod
    def _false_is_none(cls, v: bool | str | None) -> bool | str | None:
        return v or None

    @field_validator("kwargs")
    @classmethod
    def _rgb_input(cls, v: dict[str, Any]) -> dict[str, Any]:
        # before, the first step's conv2d traceback: every store's images are decoded as RGB
        if v.get("in_chans", 3) != 3:
            raise ValueError(f"the data pipeline gives the model RGB images (3 channels), so in_chans must be 3 "
                             f"(got {v['in_chans']}); grey images are read as RGB too")
        return v


class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = Field(
        default="adamw", description="The optimizer (timm's `create_optimizer_v2`).")
    lr: float = Field(
        default=1.0e-3, gt=0, description="Peak learning rate, after the warm-up (scaled by `lr_base_batch` when "
        "that is set).")
    weight_decay: float = Field(
        default=0.05, ge=0, description="Weight decay; biases and norm layers get none. In a dino run, where the "
        "schedule of `dino.weight_decay_end` starts.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum (sgd only).")
    lr_base_batch: int | None = Field(
        default=None, gt=0, description="When set, the learning rate is `lr * global_batch / lr_base_batch`, "
        "global batch = `data.batch_size` x processes x `train.accum_steps` (the linear scaling rule).")
    warmup_epochs: float = Field(
        default=0.0, ge=0, description="Linear warm-up from `min_lr`, in epochs (fractions allowed), then a cosine "
        "decay to `min_lr`; the schedule is per optimizer step.")
    min_lr: float = Field(default=0.0, ge=0, description="Where the warm-up starts and the cosine ends.")
    schedule_start_epoch: int = Field(
        default=0, ge=0, description="Epochs done where the warm-up and cosine begin: they span the epochs from "
        "here to `train.epochs`. The nightly flow sets it to the epochs done before each night, so that each night "
        "restarts them (a warm restart from the night before's weights, optimizer state and EMA); a run resumed "
        "within a night keeps it, from its config. Below `train.epochs`. The lr's schedule only: a dino run's own "
        "(teacher momentum, weight decay, teacher temperature, frozen last layer) span the whole run.")
    layer_decay: float | None = Field(
        default=None, gt=0, le=1, description="Layer-wise learning-rate decay (timm's `layer_decay`): each layer "
        "from the head down gets this factor once more.")
    clip_grad: float | None = Field(
        default=None, gt=0, description="Clip the gradients' global norm to this; null = no clipping.")
    fused: bool = Field(
        default=True, description="On a GPU, torch's fused optimizer kernel (one launch updates every parameter); "
        "false: its foreach kernels.")


class TrainConfig(Section):
    epochs: int = Field(default=10, ge=1, description="Epochs to train. To train N more, raise it and resume.")
    max_steps: int | None = Field(default=None, ge=1, description="When set, stop after this many optimizer steps.")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        default="auto", description="Mixed precision. auto: bf16 where the GPU has it, else fp16 (with a "
        "GradScaler); off on CPU.")
    compile: bool = Field(default=False, description="`torch.compile` the model.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        default="default", description="The mode `train.compile` compiles with (timm's `--torchcompile-mode`). "
        "reduce-overhead replays the compiled step as CUDA graphs: few kernel launches, for steps the CPU cannot "
        "launch fast enough. Needs `train.accum_steps` 1 (graphs give wrong accumulated gradients, "
        "pytorch/pytorch#169545).")
    accum_steps: int = Field(default=1, ge=1, description="Micro-batches accumulated per optimizer step.")
    batch_ramp: int = Field(
        default=0, ge=0, description="Batch-size ramp-up by accumulation: epoch e (0-based) < batch_ramp "
        "accumulates ceil(accum_steps * (e + 1) / (batch_ramp + 1)) micro-batches, reaching `accum_steps` at epoch "
        "batch_ramp.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Label smoothing of the classify loss.")
    mixup: float = Field(
        default=0.0, ge=0, description="Mixup alpha (timm's `Mixup`); 0 = off. Needs an even `data.batch_size`.")
    cutmix: float = Field(
        default=0.0, ge=0, description="CutMix alpha (timm's `Mixup`); 0 = off. Needs an even `data.batch_size`.")
    ema_decay: float | None = Field(
        default=None, gt=0, lt=1, description="Keep an EMA of the weights (timm's `ModelEmaV3`), evaluated beside "
        "the model as `ema_val_*`; null = none. Refused by task dino, whose teacher already is an EMA.")
    log_every: int = Field(
        default=10, ge=1, description="Optimizer steps between log lines and TensorBoard train scalars (loss, lr, "
        "grad norm, images/s, data-wait share, GPU memory and utilisation).")
    deterministic: bool = Field(
        default=False, description="`torch.use_deterministic_algorithms`: a resume bitwise equal to an "
        "uninterrupted run (on GPUs at some speed cost).")
    profile: tuple[Step, Step] | None = Field(
        default=None, description="[first, count]: torch.profiler over optimizer steps first .. first + count - 1 "
        "(first >= 1): a Chrome trace per process in the run dir's profile/, and in the log the time a step, the "
        "GPU's busy share and the top kernels; null = off.")
    cudnn_benchmark: bool = Field(
        default=True, description="cuDNN times its convolution algorithms on the first batch of each input shape "
        "and keeps the fastest (as timm's train.py does). Off under `deterministic`.")

    @field_validator("amp", mode="before")
    @classmethod
    def _off_is_off(cls, v: object) -> object:
        return "off" if v is False else v  # YAML reads a bare `off` (in a file or an override) as false


class CheckpointConfig(Section):
    every_steps: int = Field(
        default=500, ge=1, description="Optimizer steps between checkpoints; one is also written after each epoch "
        "(after its eval).")
    keep: int = Field(default=3, ge=1, description="Step checkpoints kept, locally and in storage.")
    storage: str | None = Field(
        default=None, description="Where checkpoints are copied in the background: `s3://bucket/prefix` or a NAS "
        "path; null = local only.")
    upload_timeout: float = Field(
        default=600.0, ge=0, description="Seconds the run waits for its uploads at its end.")
    preempt_timeout: float = Field(
        default=60.0, ge=0, description="Seconds a preempted run waits for its last upload.")

    @field_validator("storage")
    @classmethod
    def _names_a_place(cls, v: str | None) -> str | None:
        if v is not None and (problem := url_problem(v)):
            raise ValueError(problem)
        return v


class DetectConfig(Section):
    """task: detect: a torchvision detector on the timm `model.name` backbone (features_only) with an FPN."""

    head: Literal["fcos", "retinanet"] = Field(default="fcos", description="torchvision's `FCOS` or `RetinaNet`.")
    out_indices: tuple[int, ...] = Field(
        default=(2, 3, 4), description="timm feature levels into the FPN (strides 8, 16, 32 on a resnet), from "
        "fine to coarse, each once.")
    p6p7: bool = Field(
        default=True, description="Two more FPN levels (strides x2, x4) from the last one, as FCOS and RetinaNet "
        "do.")
    fpn_channels: int = Field(default=256, ge=32, multiple_of=32, description="Channels of the FPN and the head.")
    head_convs: int = Field(default=4, ge=1, description="FCOS head depth (convolutions per branch).")
    score_thresh: float = Field(
        default=0.05, ge=0, le=1, description="Detections kept for evaluation (COCO mAP wants a low one).")
    nms_thresh: float = Field(default=0.6, gt=0, le=1, description="IoU above which NMS drops the lower-scored box.")
    detections_per_img: int = Field(
        default=100, ge=1, description="At most this many detections per image, after NMS.")
    topk_candidates: int = Field(default=1000, ge=1, description="Candidates per FPN level, before NMS.")
    predict_score_thresh: float = Field(
        default=0.25, ge=0, le=1, description="`shardtrain predict`'s default `--conf`.")

    @field_validator("out_indices")
    @classmethod
    def _fine_to_coarse(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        # the FPN builds its levels in this order, each from the next coarser one (before: IndexError,
        # torchvision's anchor assertion or a channel mismatch in the first step)
        if not v or any(b <= a for a, b in zip(v, v[1:])) or v[0] < 0:
            raise ValueError(f"one or more feature levels >= 0, in increasing order, each once (got {list(v)})")
        return v


class DinoConfig(Section):
    """task: dino (Caron et al. 2021); defaults are DINO's ViT-S/16 recipe."""

    out_dim: int = Field(default=65536, ge=1, description="Prototypes: the head's output size.")
    hidden_dim: int = Field(default=2048, ge=1, description="Width of the head's MLP.")
    bottleneck_dim: int = Field(
        default=256, ge=1, description="The head's bottleneck, L2-normalised, before the prototype layer.")
    head_layers: int = Field(default=3, ge=1, description="Layers of the head's MLP.")
    norm_last_layer: bool = Field(
        default=True, description="Keep the prototypes unit-norm (weight-norm magnitude frozen at 1).")
    student_temp: float = Field(default=0.1, gt=0, description="The student's softmax temperature.")
    teacher_temp: float = Field(
        default=0.04, gt=0, description="The teacher's softmax temperature, after the warm-up.")
    warmup_teacher_temp: float = Field(
        default=0.04, gt=0, description="The teacher's temperature at the start, linear (per step) to "
        "`teacher_temp` over `warmup_teacher_temp_epochs`.")
    warmup_teacher_temp_epochs: float = Field(
        default=0.0, ge=0, description="Epochs of the teacher temperature's warm-up.")
    center_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="EMA momentum of the center: the teacher outputs' mean over the "
        "global batch.")
    momentum_teacher: float = Field(
        default=0.996, ge=0, le=1, description="Teacher EMA momentum at the start, to 1 along a cosine over the "
        "lr schedule's steps (from `optim.schedule_start_epoch`: each night of the nightly flow again).")
    weight_decay_end: float | None = Field(
        default=0.4, ge=0, description="Weight decay goes from `optim.weight_decay` to this along a cosine over the "
        "lr schedule's steps; null = constant.")
    freeze_last_layer: float = Field(
        default=1.0, ge=0, description="Epochs the prototype layer is not updated (its gradient dropped: no "
        "update, no decay, no optimizer state).")
    koleo_weight: float = Field(
        default=0.0, ge=0, description="DINOv2's KoLeo regulariser on the student's backbone features of each "
        "global crop; 0 = off.")


class EvalConfig(Section):
    metric: str = Field(
        default="val_top1", description="The metric best.pt and the nightly promotion go by (higher is better): "
        "`val_<m>` for a metric m of the task (classify: top1, top5; dino: knn_top1; detect: map, map50), or "
        "`ema_val_<m>` with `train.ema_decay` (classify, detect). Default: `val_` and the task's first.")
    every_epochs: int = Field(
        default=1, ge=1, description="Epochs between evals; the last epoch is always evaluated.")
    knn_path: str | None = Field(
        default=None, description="dino: the labeled (imagefolder) store of the k-NN eval; null = `data.path`. "
        "Refused in runs of another task, as are `knn_k` and `knn_temperature` other than their defaults.")
    knn_k: int = Field(default=20, ge=1, description="dino: neighbours that vote in the k-NN eval.")
    knn_temperature: float = Field(
        default=0.07, gt=0, description="dino: each neighbour votes exp(cosine similarity / this).")


# The eval keys that task dino alone reads (its k-NN evaluation): in another task's run, a change would do nothing.
KNN_KEYS = ("knn_path", "knn_k", "knn_temperature")


class RunConfig(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$", description="The run's name: its directory is `<runs_dir>/<name>/`, its "
        "storage `<checkpoint.storage>/<name>/`.")
    runs_dir: str = Field(default="runs", description="The folder of run directories.")
    task: str = Field(
        default="classify", description="What the run trains: a name in `training.tasks.TASKS` (classify, dino, "
        "detect).")
    seed: int = Field(default=0, description="Seeds the weights' init, the data order and every augmentation.")
    data: DataConfig = Field(description="The shard store and how it becomes batches (`pipelines.DataConfig`).")
    model: ModelConfig = Field(default=ModelConfig(), description="The timm model.")
    optim: OptimConfig = Field(default=OptimConfig(), description="Optimizer and learning-rate schedule.")
    train: TrainConfig = Field(
        default=TrainConfig(), description="The loop: length, precision, accumulation, regularisation, logging.")
    checkpoint: CheckpointConfig = Field(
        default=CheckpointConfig(), description="When checkpoints are written, how many are kept, and where they "
        "are copied.")
    resume: str = Field(
        default="auto", description="auto: the newest complete checkpoint of the run dir, else of storage, else "
        "start fresh; never: start fresh (refused when the run already has checkpoints); or a checkpoint path or "
        "URL.")
    eval: EvalConfig = Field(default=EvalConfig(), description="Evaluation: which metric picks best.pt, how often.")
    # Settings of one task, present only in its runs (filled with the defaults there; refused elsewhere).
    detect: DetectConfig | None = Field(
        default=None, description="The detector: a torchvision detector on the timm `model.name` backbone "
        "(features_only) with an FPN.")
    dino: DinoConfig | None = Field(
        default=None, description="DINO (Caron et al. 2021); the defaults are DINO's ViT-S/16 recipe.")

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
    def _knn_in_dino_only(self) -> RunConfig:
        """A resolved config (a run dir's config.yaml) holds every key: only a value other than the default says
        the user set it."""
        changed = [k for k in KNN_KEYS if getattr(self.eval, k) != EvalConfig.model_fields[k].default]
        if self.task != "dino" and changed:
            raise ValueError(f"eval.{changed[0]} is for task dino (its k-NN evaluation); this run's task is "
                             f"{self.task}")
        return self

    @model_validator(mode="after")
    def _schedule_in_run(self) -> RunConfig:
        start, epochs = self.optim.schedule_start_epoch, self.train.epochs
        if start >= epochs:
            raise ValueError(f"optim.schedule_start_epoch {start} must be below train.epochs {epochs}: the lr "
                             "schedule would have no epochs to run over")
        return self

    @model_validator(mode="after")
    def _cuda_graphs(self) -> RunConfig:
        t = self.train
        if not t.compile or t.compile_mode not in ("reduce-overhead", "max-autotune"):
            return self
        if t.accum_steps > 1:  # a replay rewrites the gradients the last backward left (pytorch/pytorch#169545)
            raise ValueError(f"train.compile_mode={t.compile_mode} runs CUDA graphs, which do not accumulate "
                             "gradients correctly; set train.accum_steps=1 or compile_mode=default")
        if self.task == "detect":  # the head's graph would read the backbone's outputs (pytorch/pytorch#160281)
            raise ValueError(f"train.compile_mode={t.compile_mode}: detection compiles its backbone and head "
                             "apart, and CUDA graphs cannot chain them; use compile_mode=default")
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


def make_dir(path: Path, what: str) -> None:
    """`path` made with its parents, or a one-line error naming the setting it came from (`what`: --out,
    runs_dir) where a file stands in the way."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise TrainError(f"{what} {path} is a file; give a folder") from None
    except NotADirectoryError:
        raise TrainError(f"{what} {path}: a file stands in its path; give a folder") from None
    except OSError as e:
        raise TrainError(f"{what} {path}: cannot make the folder: {e.strerror}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read the YAML at `path`, apply dotted `key.sub=value` overrides, validate."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise TrainError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # a comment saved in Latin-1, or not a text file at all
        raise TrainError(f"config {path} is not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start}; "
                         "save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise TrainError(f"config {path} is not valid YAML: {yaml_problem(e)}") from None
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
    try:
        node[leaf] = yaml.safe_load(value) if value else None
    except yaml.YAMLError as e:
        raise TrainError(f"override {item!r}: the value is not valid YAML ({yaml_problem(e)}); a string that "
                         f"YAML reads otherwise goes in quotes: {key}='\"...\"'") from None


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
        close = difflib.get_close_matches(str(err["loc"][-1]), section_keys(err["loc"][:-1]), n=1)
        return f"unknown config key {key}" + (f" (did you mean {'.'.join([*map(str, err['loc'][:-1]), *close])}?)"
                                               if close else "")
    if err["type"] == "missing" and err["loc"] and isinstance(err["loc"][-1], int):  # a list one or more short
        parent = ".".join(str(p) for p in err["loc"][:-1])
        short = sum(1 for x in e.errors() if x["type"] == "missing" and x["loc"][:-1] == err["loc"][:-1])
        given = len(err["input"])
        return f"bad value for {parent}: {given + short} values, not {given} (got {shown(err['input'])})"
    if err["type"] == "missing":
        return f"missing config key {key}"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    if not err["loc"]:  # a check across keys: its message names them
        return f"bad config: {msg}{more}"
    return f"bad value for {key}: {msg} (got {shown(err.get('input'))}){more}"


def shown(value: Any) -> str:
    """A config value as the YAML spells it where Python's repr does not (true, null), else its repr."""
    if isinstance(value, bool) or value is None:
        return "null" if value is None else str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(shown, value)) + "]"
    return repr(value)


def section_keys(loc: Sequence[int | str]) -> list[str]:
    """The keys of the config section at `loc` (() for the top level); none where it is not a section."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        kinds = (field.annotation, *get_args(field.annotation)) if field else ()
        sections = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]  # a section may be optional
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain YAML/JSON-safe values."""
    return cfg.model_dump(mode="json")
