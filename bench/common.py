"""What every benchmark shares (DESIGN.md, "How we test"): the machine it ran on, and its JSON line,
printed last and appended to bench/results/<bench>.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def machine() -> dict:
    """CPU count, GPU name and count, torch version; never a host name."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__}


def record(bench: str, result: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f"{bench}.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))
