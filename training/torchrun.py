"""`python -m training.torchrun ARGS`: torchrun, ending with one line and the workers' exit code.

Plain torchrun ends a failed run with a log line, a Python traceback and exit code 1, whatever the workers
said; here a worker's `error: ...` line stays the last word and its exit code (2 bad input, 75 preempted)
becomes the launcher's. A worker that died without its line (a crash, a kill) gets one line saying how.

Plain torchrun also takes every SIGTERM/SIGINT as a new order to stop: a second one cuts short its wait for
the workers' save, and it kills them. Yet one request often reaches it twice (the launcher passes its signal
on, and a terminal or a scheduler signals torchrun directly as well), so here a repeat within moments is
ignored (training.preempt.StopSignals) and only a later one stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

# Importing torch takes seconds; a Ctrl-C in that window ends quietly (nothing is started yet), at once
# (training.preempt.exit_now says why).
signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402

from training.preempt import StopSignals  # noqa: E402


def stop_workers(signum: int) -> None:
    """What torchrun's own handler does: its agent catches this, signals the workers and waits for them.

    The workers get SIGTERM whichever signal came: one still importing then dies quietly (a SIGINT would
    print a KeyboardInterrupt traceback), and one training saves on either.
    """
    name = signal.Signals(signum).name
    raise SignalException(f"Process {os.getpid()} got signal: {name}", sigval=signal.SIGTERM)


def failure_line(codes: list[int]) -> str:
    """One line for workers that failed with these exit codes (negative: the signal that killed them)."""
    hows = [f"killed by {signal.Signals(-c).name}" if c < 0 else f"exit code {c}" for c in codes]
    killed = " (out of memory, or killed)" if -signal.SIGKILL in codes else ""
    return f"error: training process(es) failed: {', '.join(hows)}{killed}"


def without_failure_log(record: logging.LogRecord) -> bool:
    """torchrun's agent logs the first failed worker's exit code, pid and binary; our line says it for the user."""
    return not str(record.msg).startswith("failed (exitcode")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(without_failure_log)
    args.signals_to_handle = "SIGHUP,SIGQUIT"  # torchrun's own handlers stay for these; SIGTERM, SIGINT are ours
    try:
        with StopSignals(first=stop_workers, insist=lambda signum: os._exit(128 + signum)):
            run(args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if codes != [2]:  # exit code 2: the workers said why in their own error line
            print(failure_line(codes), file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
