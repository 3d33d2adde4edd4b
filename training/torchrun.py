"""`python -m training.torchrun ARGS`: torchrun, ending with one line and the workers' exit code.

Plain torchrun ends a failed run with a log line, a Python traceback and exit code 1, whatever the workers
said; here a worker's `error: ...` line stays the last word and its exit code (2 bad input, 75 preempted)
becomes the launcher's. A run whose first failed worker died without its line (an exception, a crash, a kill)
ends with one line naming that rank and its error (as `record` wrote it), or how it died.

Plain torchrun also takes every SIGTERM/SIGINT as a new order to stop: a second one cuts short its wait for
the workers' save, and it kills them. Yet one request often reaches it twice (the launcher passes its signal
on, and a terminal or a scheduler signals torchrun directly as well), so here a repeat within moments is
ignored (training.preempt.StopSignals) and only a later one stops at once.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys

# Importing torch takes seconds; a Ctrl-C in that window ends quietly (nothing is started yet), at once
# (training.preempt.exit_now says why).
signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure  # noqa: E402
from torch.distributed.elastic.rendezvous.api import RendezvousError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402

from training.preempt import EXIT_PREEMPTED, StopSignals  # noqa: E402

# Exit codes of a rank that printed its own line saying why: a bad input or setting (2), preempted and saved (75).
SAID_WHY = (2, EXIT_PREEMPTED)
OUT_OF_MEMORY = " (out of memory, or killed)"


def stop_workers(signum: int) -> None:
    """What torchrun's own handler does: its agent catches this, signals the workers and waits for them.

    The workers get SIGTERM whichever signal came: one still importing then dies quietly (a SIGINT would
    print a KeyboardInterrupt traceback), and one training saves on either.
    """
    name = signal.Signals(signum).name
    raise SignalException(f"Process {os.getpid()} got signal: {name}", sigval=signal.SIGTERM)


def failure_line(error: ChildFailedError) -> str:
    """One line naming the rank that failed first, the root cause: the others mostly fail because of it (their
    collectives lose a peer, torchrun terminates them), and torchrun lists those too."""
    rank, failure = error.get_first_failure()
    first = " first" if len(error.failures) > 1 else ""
    return f"error: rank {rank} failed{first}: {how(failure)}"


def how(failure: ProcessFailure) -> str:
    """The rank's exception as its error file holds it (written by `record` in training.__main__), else the
    signal that killed it or its exit code."""
    recorded = failure.message.get("message", "") if isinstance(failure.message, dict) else ""
    if recorded.strip():
        said = recorded.strip().splitlines()[0]
        # torch's words for a DataLoader worker that got SIGKILL: the kernel's OOM killer, most often
        return said + (OUT_OF_MEMORY if said.endswith("killed by signal: Killed.") else "")
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}" + (OUT_OF_MEMORY if failure.exitcode == -signal.SIGKILL else "")
    return f"exit code {failure.exitcode}"


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
        _, first = e.get_first_failure()
        if first.exitcode not in SAID_WHY:
            print(failure_line(e), file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException as e:
        return 128 + int(e.sigval)
    except RendezvousError as e:  # no node answered at --rdzv-endpoint (after torchrun's own timeout)
        said = str(e).strip() or str(e.__cause__ or "").strip()
        why = type(e).__name__ + (f": {said.splitlines()[0]}" if said else "")
        print(f"error: the rendezvous at {args.rdzv_endpoint} failed ({why}); is the launch on that host running, "
              "and its port open from here?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # As flows/cli.py does: the interpreter's last garbage collection walks every object torch made, after the
    # workers have ended. Objects frozen are left to the OS.
    atexit.register(gc.freeze)
    sys.exit(main(sys.argv[1:]))
