"""The training stall of a checkpoint save: the snapshot of model and optimizer state to CPU memory
(`training.checkpoint.to_cpu`), against the blocking copy per tensor it replaced, side by side in one process.

    python bench/checkpoint_stall.py                         # resnet50 and vit_small_patch16_224, AdamW (fused)
    python bench/checkpoint_stall.py --models resnet50 --rounds 20

Each round queues one training step (forward, backward, optimizer; batch 128 at 224, bf16) and, without waiting
for it, takes the snapshot as `Trainer.save` does: the stall is the time from the call to its return, so it holds
the queued step's remaining GPU time in both arms. A third arm waits for the step alone (the floor no snapshot
goes under). The arms alternate round by round; each figure is the median over the rounds. The last line is one
JSON object, also appended to bench/results/checkpoint_stall.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import timm
import torch

from common import machine, print_table, record
from pipelines.gpu import tensors
from training.checkpoint import map_tensors, to_cpu


def blocking_copies(state: Any) -> Any:
    """The baseline: each tensor copied to pageable CPU memory by a blocking copy of its own."""
    return map_tensors(lambda t: t.detach().to("cpu", copy=True), state)


def wait_only(state: Any) -> None:
    torch.cuda.synchronize()


def model_state(name: str, batch: int) -> tuple[dict, Callable[[], None]]:
    """A model with its AdamW state (after one step), and a function that queues one more training step."""
    model = timm.create_model(name, num_classes=1000).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vit_small_patch16_224")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this bench needs a CUDA GPU")

    arms: dict[str, Callable[[Any], Any]] = {"blocking copy per tensor (before)": blocking_copies,
                                             "pinned, one wait (to_cpu)": to_cpu, "the queued step alone": wait_only}
    out: dict[str, Any] = {"bench": "checkpoint_stall", "batch": args.batch, "machine": machine()}
    table = []
    for name in args.models.split(","):
        state, step = model_state(name, args.batch)
        mib = sum(t.numel() * t.element_size() for t in tensors(state)) / 2**20
        stalls: dict[str, list[float]] = {arm: [] for arm in arms}
        for r in range(args.rounds + 1):
            for arm, fn in arms.items():
                step()
                start = time.perf_counter()
                fn(state)
                if r:  # the first round allocates (pinned blocks, the caching allocator's)
                    stalls[arm].append(time.perf_counter() - start)
        for arm, values in stalls.items():
            table.append((f"{name} ({mib:.0f} MiB): {arm}", statistics.median(values), max(values)))
        medians = [statistics.median(v) for v in stalls.values()]
        key = name.split("_patch")[0]
        out |= {f"state_mib_{key}": round(mib), f"stall_s_{key}_before": round(medians[0], 4),
                f"stall_s_{key}": round(medians[1], 4), f"step_wait_s_{key}": round(medians[2], 4),
                f"ratio_{key}": round(medians[0] / medians[1], 2)}
    print_table({"median s": ".4f", "max s": ".4f"}, table)
    record("checkpoint_stall", out)


if __name__ == "__main__":
    main()
