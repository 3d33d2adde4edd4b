"""timm model creation: timm's own pretrained weights through the Hugging Face cache, or weights from a path or URL.

`model.pretrained: true` takes timm's weights for `model.name` (`deit_small_patch16_224.fb_in1k`, an untagged
name's default tag, or `hf-hub:org/repo`) the way timm users get them: huggingface_hub downloads them into its
cache (`HF_HOME`, default ~/.cache/huggingface) once and reads them from there after, offline too
(`HF_HUB_OFFLINE=1`). `hub_weights` makes sure they are there before torchrun starts; every rank then loads them
from the cache through timm.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import timm
import torch
from huggingface_hub import constants as hf_constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

from training.config import ModelConfig, TrainError

HF_HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order of preference on the hub


def check_model_name(name: str) -> None:
    """A one-line TrainError unless timm knows `name` (and its pretrained tag, when it has one)."""
    if name.startswith(HF_HUB_PREFIX):
        return  # its config is on the hub: checked when the weights are fetched
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise TrainError(f"bad value for model.name: no timm model named {name!r}{hint}")
    arch, _, tag = name.partition(".")
    if tag and name not in timm.models.get_arch_pretrained_cfgs(arch):
        tags = [t.partition(".")[2] for t in timm.models.get_arch_pretrained_cfgs(arch)]
        raise TrainError(f"bad value for model.name: timm's {arch} has no pretrained tag {tag!r} "
                         f"(it has: {', '.join(tags) or 'none'})")


def hub_weights(name: str) -> str:
    """The local file of timm's pretrained weights for `name`, fetched into the Hugging Face cache when the hub
    can be reached, else found there; a one-line TrainError naming the model and the fixes otherwise."""
    check_model_name(name)
    extra: tuple[str, ...] = ()
    files: tuple[str, ...]
    if name.startswith(HF_HUB_PREFIX):
        repo, files, extra = name.removeprefix(HF_HUB_PREFIX), WEIGHT_FILES, ("config.json",)
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            where = f" (only at {cfg.url})" if cfg is not None and cfg.url else ""
            raise TrainError(f"model.pretrained: timm has no Hugging Face hub weights for {name}{where}; "
                             "set model.pretrained to a local path or URL of the weights")
        repo, files = cfg.hf_hub_id, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILES
    repo, _, revision = repo.partition("@")
    with hub_errors(name, repo):
        for filename in extra:
            hf_hub_download(repo, filename, revision=revision or None)
        not_cached = None
        for filename in files:
            try:
                return hf_hub_download(repo, filename, revision=revision or None)
            except LocalEntryNotFoundError as e:
                not_cached = e  # maybe the next candidate is cached
            except EntryNotFoundError:
                continue  # the repo has no such file: try the next one, as timm does
        if not_cached is not None:
            raise not_cached
    raise TrainError(f"model.pretrained: the Hugging Face repo {repo} has none of {', '.join(files)}")


@contextlib.contextmanager
def hub_errors(name: str, repo: str) -> Iterator[None]:
    """Turn huggingface_hub's errors (not cached while offline, unknown repo, HTTP trouble) into one line."""
    try:
        yield
    except LocalEntryNotFoundError:
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if hf_constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise TrainError(
            f"model.pretrained: timm's weights for {name} ({repo}) are not in the Hugging Face cache "
            f"{hf_constants.HF_HUB_CACHE} and {why}: fill that cache (run once where the hub is reachable, with "
            "the same HF_HOME), or set model.pretrained to a local path or URL of the weights") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"model.pretrained: cannot fetch timm's weights for {name} ({repo}): {first}") from None


def local_weights(url: str, cache_dir: Path) -> str:
    """A local path for `url`: the path itself, or a copy fetched once through fsspec."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if not os.path.isfile(path):
            raise TrainError(f"model.pretrained: no such file {path}")
        return path
    try:
        fs, path = fsspec.core.url_to_fs(url)
        dest = cache_dir / Path(path).name
        if not dest.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
            fs.get_file(path, str(tmp))
            os.replace(tmp, dest)
        return str(dest)
    except (OSError, ValueError, ImportError) as e:
        raise TrainError(f"model.pretrained: cannot fetch {url}: {e}") from None


def weight_names(path: str) -> list[str]:
    """The tensor names in a local weights file, read without loading a tensor (safetensors' header; torch.load
    onto the meta device), unwrapped as timm unwraps a checkpoint (`state_dict`, `model`; a `module.` prefix).
    A shardtrain DINO checkpoint, whose `model` is student, teacher and centre, and a file neither reads are one
    line each."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        ckpt = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:  # torch.load's errors on a file of another kind are of every type (KeyError: 101)
        why = str(e).splitlines()[0][:120] if str(e) else ""
        raise TrainError(f"model.pretrained: {path} is not a weights file torch or safetensors reads "
                         f"({type(e).__name__}: {why})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and ckpt["config"].get("task") == "dino":
        raise TrainError(f"model.pretrained: {path} is a DINO checkpoint (student, teacher and centre): export "
                         "its teacher's backbone with `shardtrain export CONFIG CHECKPOINT --out DIR` and set "
                         "model.pretrained to DIR/model.safetensors")
    for key in ("state_dict", "model"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    return [str(k).removeprefix("module.") for k in ckpt] if isinstance(ckpt, dict) else []


def architecture(cfg: ModelConfig) -> torch.nn.Module:
    """`cfg`'s model as `build_model` makes it, without weights, on the meta device (no memory, nothing fetched):
    what the checks before a run look at."""
    try:
        with torch.device("meta"):
            return timm.create_model(cfg.name, num_classes=0, **cfg.kwargs)
    except TypeError as e:
        raise TrainError(f"model {cfg.name}: {e} (check model.kwargs)") from None


def fixed_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The one input size a timm model takes, (height, width), for a ViT-style patch embedding built for one size
    (without `dynamic_img_size`); None when any size passes."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(model, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", False):
        return None
    height, width = embed.img_size
    return int(height), int(width)


def build_model(cfg: ModelConfig, num_classes: int, cache_dir: Path) -> torch.nn.Module:
    check_model_name(cfg.name)
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path or None, **cfg.kwargs)
    if cfg.pretrained is True:
        kwargs.update(pretrained=True)  # timm's own loading, from the Hugging Face cache
    elif cfg.pretrained:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": local_weights(cfg.pretrained, cache_dir)})
    hub = hub_errors(cfg.name, cfg.name.removeprefix(HF_HUB_PREFIX)) if cfg.pretrained is True \
        else contextlib.nullcontext()
    try:
        with hub:
            model = timm.create_model(cfg.name, **kwargs)
    except TypeError as e:
        raise TrainError(f"model {cfg.name}: {e} (check model.kwargs)") from None
    except RuntimeError as e:
        raise TrainError(f"model {cfg.name}: cannot load model.pretrained weights: {str(e).splitlines()[0]}") from None
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)  # type: ignore[operator]  # timm's, reached through Module.__getattr__
    return model
