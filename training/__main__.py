"""`python -m training CONFIG [key.sub=value ...]`: one rank of a run (what `launch` starts under torchrun)."""

from __future__ import annotations

import atexit
import gc
import sys
from functools import partial

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from pipelines import DataError
from training.config import TrainError, load_config
from training.dist import die_with_launcher
from training.preempt import EXIT_PREEMPTED
from training.train import Preempted, run


class Recorder(ErrorHandler):
    """Writes an uncaught exception to the rank's error file, where torchrun reads it (training.torchrun names
    it in the run's last line). A signal handler may raise while it does so: torch's SIGCHLD one, for a
    DataLoader worker whose death first broke a transfer (ConnectionResetError); that later exception says
    what happened, and is recorded instead."""

    def record_exception(self, e: BaseException) -> None:
        try:
            super().record_exception(e)
        except Exception as later:
            super().record_exception(later)
            raise


@partial(record, error_handler=Recorder())
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
    # As flows/cli.py does: the interpreter's last garbage collection walks every object torch and timm made,
    # over a second after the run is done, on every rank of every run. Objects frozen are left to the OS.
    atexit.register(gc.freeze)
    sys.exit(main(sys.argv[1:]))
