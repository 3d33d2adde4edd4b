"""Does a Python thread in the training process slow the step's kernel launches? (issue 19: the GPU decode paths
lose ~10% of ResNet-50's ceiling with 4 workers, in gaps where the step's stream waits for the host to launch.)

    python bench/launch_contention.py --duties 0.07,0.15,0.3,0.5

ResNet-50's compiled step (`train_throughput.make_step`, batch 256 on the GPU, as the ceiling) alone, then beside one
thread of each kind, side by side in one process:
- `python_<duty>`: pure Python (it holds the interpreter lock) for `duty` of every 45 ms, then asleep; 0.07 is
  about the DALI feeding thread's 3 ms a batch, 1.0 never sleeps (the step then ran 100x slower: minutes);
- `launches`: tiny copies on a side stream in a loop (CUDA API calls, each releasing the lock), as an input
  pipeline's own small kernels are launched.
Each rate is against the mean of the step alone before and after them.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from collections.abc import Callable

import torch

from common import machine, record
from train_throughput import ceiling, make_step

PERIOD_S = 0.045  # about one ResNet-50 step at batch 256 on an H100


def python_thread(duty: float, stop: threading.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < duty * PERIOD_S:
            sum(range(100))
        time.sleep((1 - duty) * PERIOD_S)


def launch_thread(stop: threading.Event) -> None:
    a, b = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    with torch.cuda.stream(torch.cuda.Stream()):
        while not stop.is_set():
            a.copy_(b, non_blocking=True)


def beside(side: Callable[[threading.Event], None], rate: Callable[[], float]) -> float:
    """`rate()` while `side` runs in a thread of this process."""
    stop = threading.Event()
    thread = threading.Thread(target=side, args=(stop,), daemon=True)
    thread.start()
    try:
        return rate()
    finally:
        stop.set()
        thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duties", default="0.07,0.15,0.3,0.5", help="the Python threads' shares of each 45 ms")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("launch_contention: needs a CUDA GPU")

    step = make_step("resnet50", 1000, compile=True)

    def rate() -> float:
        return ceiling(step, args.batch, 1000, warmup=5, steps=args.steps)

    rate()  # compile and warm up
    alone = [rate()]
    sides: dict[str, Callable[[threading.Event], None]] = {
        f"python_{d}": functools.partial(python_thread, float(d)) for d in args.duties.split(",")}
    sides["launches"] = launch_thread
    rates = {name: beside(side, rate) for name, side in sides.items()}
    alone.append(rate())
    base = sum(alone) / 2
    print(f"alone {alone[0]:.0f} / {alone[1]:.0f} images/s")
    for name, r in rates.items():
        print(f"beside {name}: {r:.0f} images/s, {r / base:.3f} of alone")
    record("launch_contention", {"bench": "launch_contention", "machine": machine(), "batch": args.batch,
                                 "alone": [round(a, 1) for a in alone],
                                 "beside": {k: round(v, 1) for k, v in rates.items()}})


if __name__ == "__main__":
    main()
