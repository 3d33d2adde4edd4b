"""`python -m training CONFIG [key.sub=value ...]`: one rank of a run (what `launch` starts under torchrun)."""

from __future__ import annotations

import sys

from pipelines import DataError
from training.config import TrainError, load_config
from training.dist import die_with_launcher
from training.preempt import EXIT_PREEMPTED
from training.train import Preempted, run


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m training CONFIG [key.sub=value ...]", file=sys.stderr)
        return 2
    die_with_launcher()
    try:
        run(load_config(argv[0], argv[1:]))
    except Preempted:
        return EXIT_PREEMPTED
    except (TrainError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
