"""`python -m training.torchrun ARGS`: torchrun, ending with one line and the workers' exit code.

Plain torchrun ends a failed run with a Python traceback and exit code 1, whatever the workers said;
here a worker's `error: ...` line stays the last word and its exit code (2 bad input, 75 preempted)
becomes the launcher's.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str]) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        print(f"error: {len(e.failures)} training process(es) failed (exit code {', '.join(map(str, codes))})",
              file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
