"""`shardtrain doctor`: what this machine (or container) offers a training run, and what is missing.

Each check is a plain function returning a dict; `diagnose` gathers them into one report whose
`problems` are the required things that are missing (the exit code) and whose `warnings` are the
things that will hurt a run without stopping it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import uuid
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from pipelines.cpus import auto_workers, usable_cpus
from shards.layouts import yaml_problem

app = typer.Typer()

SHM_MIN_BYTES = 10**9  # below 1 GB, DataLoader workers die with "bus error" in containers
MIN_PYTHON = (3, 10)


def python_info() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "executable": sys.executable,
        "ok": sys.version_info[:2] >= MIN_PYTHON,
    }


def torch_info() -> dict[str, Any]:
    """Torch and the CUDA stack it was built with; `ok` is False when torch does not import."""
    try:
        import torch
    except Exception as e:  # a broken install raises more than ImportError (OSError on a missing .so)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    cuda = torch.cuda.is_available()
    return {
        "ok": True,
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        # The libraries torch was built with load without a GPU, so a CPU host still shows them.
        "cudnn": torch.backends.cudnn.version(),
        "nccl": nccl_version() if torch.version.cuda else None,
    }


def nccl_version() -> str | None:
    import torch

    try:
        return ".".join(str(part) for part in torch.cuda.nccl.version())
    except (AttributeError, RuntimeError):  # a build without NCCL
        return None


def gpu_info() -> list[dict[str, Any]]:
    import torch

    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "memory_gb": round(props.total_memory / 1e9, 1),
                "capability": f"{props.major}.{props.minor}",
                # bf16 tensor cores start with Ampere (8.0); older cards only emulate it, slowly.
                "bf16": props.major >= 8,
            }
        )
    return gpus


def hw_decoder_info() -> dict[str, Any]:
    """Whether `data.decode: hw` (and so `auto`) can use GPU 0's hardware JPEG decoder, and what or why not."""
    import torch

    from pipelines import hw

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    why = hw.unavailable(device)
    return {"usable": why is None, "detail": why or hw.describe(device)}


def dali_info() -> dict[str, Any]:
    """Whether `data.decode: dali` (NVIDIA DALI as the device half, an optional extra) can run on GPU 0."""
    import torch

    from pipelines import dali

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    why = dali.unavailable(device)
    return {"usable": why is None, "detail": why or dali.describe(device)}


def h2d_bandwidth_gbs(size_mb: int = 256, repeats: int = 5) -> float:
    """Pinned host memory to GPU 0, in GB/s: the ceiling for feeding batches to the GPU."""
    import torch

    host = torch.empty(size_mb << 20, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    device.copy_(host, non_blocking=True)  # warm-up: first copy pays for context and allocation
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        device.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return round(host.numel() * repeats / seconds / 1e9, 1)


def shm_info(path: str = "/dev/shm", min_bytes: int = SHM_MIN_BYTES) -> dict[str, Any]:
    """Size of the shared memory DataLoader workers pass batches through."""
    try:
        stat = os.statvfs(path)
    except OSError as e:
        return {"path": path, "total_gb": None, "warning": f"{path} is missing ({e.strerror})"}
    total = stat.f_blocks * stat.f_frsize
    warning = None
    if total < min_bytes:
        warning = (
            f"{path} is {total / 1e9:.2f} GB (< {min_bytes / 1e9:.2f} GB): "
            "DataLoader workers may crash with 'bus error'; run the container with --shm-size=8g or --ipc=host"
        )
    return {
        "path": path,
        "total_gb": round(total / 1e9, 2),
        "free_gb": round(stat.f_bavail * stat.f_frsize / 1e9, 2),
        "warning": warning,
    }


def cpu_info(setting: int | str | None, processes: int) -> dict[str, Any]:
    """CPUs against DataLoader workers: torchrun starts one process per GPU, each with data.workers `setting`
    (auto: its share of the CPUs, pipelines/cpus.py)."""
    cpus = usable_cpus()
    workers = auto_workers(cpus, processes) if setting == "auto" else setting
    wanted = None if workers is None else int(workers) * processes
    warning = None
    if wanted is not None and wanted > cpus:
        warning = (
            f"data.workers={workers} x {processes} process(es) = {wanted} workers on {cpus:g} CPUs: "
            "lower data.workers"
        )
    return {"count": cpus, "setting": setting, "workers": workers, "processes": processes, "workers_total": wanted,
            "warning": warning}


def storage_check(url: str) -> dict[str, Any]:
    """Write and delete a small probe object under `url` (local path, NAS path or fsspec URL)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from shards.storage import storage_error

    probe = f"{url.rstrip('/')}/.shardtrain-doctor-{uuid.uuid4().hex}"
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        if isinstance(fs, LocalFileSystem):  # training creates a missing local dir; object stores have none
            fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, b"shardtrain doctor probe\n")
        fs.rm_file(path)
    except Exception as e:  # any backend error (permissions, network, credentials) means "not writable"
        return {"url": url, "writable": False, "error": storage_error(e)}
    return {"url": url, "writable": True, "error": None}


def prefect_check(timeout: float = 3.0) -> dict[str, Any]:
    """The Prefect API the flows would use, and whether it answers /health."""
    import httpx

    try:
        from prefect.settings import PREFECT_API_URL
    except ImportError as e:
        return {"api_url": None, "healthy": False, "error": f"prefect does not import: {e}"}
    url = PREFECT_API_URL.value()
    if not url:
        return {"api_url": None, "healthy": None, "error": None}  # flows run in ephemeral mode
    try:
        status = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code
    except httpx.HTTPError as e:
        return {"api_url": url, "healthy": False, "error": f"{type(e).__name__}: {e}"}
    return {"api_url": url, "healthy": status == 200, "error": None if status == 200 else f"HTTP {status}"}


def read_config(path: Path) -> dict[str, Any]:
    """The run YAML as plain data: doctor reads two keys and must not fail on the rest."""
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config {path} is not a YAML mapping")
    return config


def config_value(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def checked_settings(config: dict[str, Any]) -> tuple[int | str | None, str | None]:
    """The two keys doctor checks against this machine: data.workers and checkpoint.storage."""
    workers, storage = config_value(config, "data.workers"), config_value(config, "checkpoint.storage")
    if workers not in (None, "auto") and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise ValueError(f"data.workers: expected a whole number >= 0 or auto, got {workers!r}")
    if storage is not None and not isinstance(storage, str):
        raise ValueError(f"checkpoint.storage: expected a path or URL, got {storage!r}")
    return workers, storage


def diagnose(workers: int | str | None = None, storage: str | None = None, require_gpu: bool = False) -> dict[str, Any]:
    """Every check, and the lists of required things missing (`problems`) and warnings."""
    report: dict[str, Any] = {"python": python_info(), "torch": torch_info()}
    problems: list[str] = []
    warnings: list[str] = []
    if not report["python"]["ok"]:
        problems.append(f"python {report['python']['version']} < {'.'.join(map(str, MIN_PYTHON))}")
    cuda = report["torch"].get("cuda_available", False)
    if not report["torch"]["ok"]:
        problems.append(f"torch does not import: {report['torch']['error']}")
    report["gpus"] = gpu_info() if cuda else []
    report["h2d_bandwidth_gbs"] = h2d_bandwidth_gbs() if cuda else None
    report["hw_jpeg_decoder"] = hw_decoder_info() if report["torch"]["ok"] else None
    report["dali"] = dali_info() if report["torch"]["ok"] else None
    if not report["gpus"]:
        (problems if require_gpu else warnings).append("no CUDA GPU visible: training runs on CPU")
    report["shm"] = shm_info()
    report["cpu"] = cpu_info(workers, max(1, len(report["gpus"])))
    warnings += [w for w in (report["shm"]["warning"], report["cpu"]["warning"]) if w]
    report["storage"] = storage_check(storage) if storage else None
    if storage and not report["storage"]["writable"]:
        problems.append(f"checkpoint storage {storage} is not writable: {report['storage']['error']}")
    report["prefect"] = prefect_check()
    prefect = report["prefect"]
    if prefect["healthy"] is False:
        where = f"Prefect API {prefect['api_url']}" if prefect["api_url"] else "Prefect"
        warnings.append(f"{where}: {prefect['error']}")
    report["problems"], report["warnings"] = problems, warnings
    report["ok"] = not problems
    return report


def render(report: dict[str, Any], console: Console) -> None:
    """The report as a table for people; `--json` gives the same data to machines."""
    t, py, shm, cpu = report["torch"], report["python"], report["shm"], report["cpu"]
    table = Table(show_header=False, box=None)
    table.add_row("python", f"{py['version']} ({py['executable']})")
    if t["ok"]:
        table.add_row("torch", f"{t['version']}  CUDA {t['cuda']}  cuDNN {t['cudnn']}  NCCL {t['nccl']}")
    else:
        table.add_row("torch", t["error"])
    for gpu in report["gpus"]:
        table.add_row(
            f"gpu {gpu['index']}",
            f"{gpu['name']}  {gpu['memory_gb']} GB  sm {gpu['capability']}  bf16 {'yes' if gpu['bf16'] else 'no'}",
        )
    if not report["gpus"]:
        table.add_row("gpu", "none")
    if report["h2d_bandwidth_gbs"] is not None:
        table.add_row("host->gpu", f"{report['h2d_bandwidth_gbs']} GB/s (pinned)")
    if report["hw_jpeg_decoder"]:
        decoder = report["hw_jpeg_decoder"]
        table.add_row("jpeg decode", f"{'hardware' if decoder['usable'] else 'CPU'}: {decoder['detail']}")
    if report["dali"]:
        table.add_row("decode: dali", f"{'usable' if report['dali']['usable'] else 'no'}: {report['dali']['detail']}")
    table.add_row("shm", f"{shm['path']} {shm['total_gb']} GB")
    workers = "" if cpu["workers"] is None else f" for {cpu['workers_total']} DataLoader workers"
    workers += " (data.workers auto)" if cpu["setting"] == "auto" else ""
    table.add_row("cpus", f"{cpu['count']:g}{workers}")
    if report["storage"]:
        s = report["storage"]
        table.add_row("storage", f"{s['url']} {'writable' if s['writable'] else 'NOT writable: ' + s['error']}")
    p = report["prefect"]
    if p["api_url"] is None:
        table.add_row("prefect", p["error"] or "no PREFECT_API_URL: flows run in ephemeral mode (no server)")
    else:
        table.add_row("prefect", f"{p['api_url']} {'healthy' if p['healthy'] else 'unreachable: ' + p['error']}")
    console.print(table)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    for problem in report["problems"]:
        console.print(f"[red]problem:[/] {problem}", highlight=False)
    console.print("[green]ok[/]" if report["ok"] else "[red]not ready[/]")


@app.command()
def doctor(
    config: Path = typer.Option(None, "--config", help="Run YAML: checks its data.workers and checkpoint.storage."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    require_gpu: bool = typer.Option(False, "--require-gpu", help="Fail when no CUDA GPU is visible."),
) -> None:
    """Check this machine for training: Python, torch/CUDA/NCCL, GPUs, the hardware JPEG decoder, /dev/shm, CPUs,
    storage, Prefect."""
    try:
        workers, storage = checked_settings(read_config(config)) if config else (None, None)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    report = diagnose(workers, storage, require_gpu=require_gpu)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        render(report, Console())
    raise typer.Exit(0 if report["ok"] else 1)
