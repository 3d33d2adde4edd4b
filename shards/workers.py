"""Worker processes that map a function over tasks, results in task order, and stop at once when one dies.

Not concurrent.futures.ProcessPoolExecutor: its workers share one result pipe. A worker killed while sending a
result (the kernel's OOM killer picks the largest process, and a worker is largest just then) leaves a cut-off
message in that pipe, and the executor's manager thread waits on the rest of it forever: the command hangs
(CPython 3.11-3.13). Here each worker has its own pipes, and only that worker holds the write end of its result
pipe, so its death, mid-message or not, is an end of file there.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT = 2  # chunks sent ahead to each worker: it starts the next as soon as it has sent a result


class WorkerDied(Exception):
    """A worker process ended before sending all its results."""


def start_method() -> str:
    """fork, unless this process has started CUDA (a notebook or a test run that used the GPU before converting):
    a forked child aborts when it frees a CUDA tensor it inherited, so there the workers come from a fork server."""
    torch = sys.modules.get("torch")
    return "forkserver" if torch is not None and torch.cuda.is_initialized() else "fork"


def ordered_map(work: Callable[[T], R], tasks: Sequence[T], workers: int, chunksize: int,
                start: str | None = None) -> Iterator[R]:
    """`work(task)` for each task, on `workers` processes (forked, or from a fork server with `start="forkserver"`;
    by default as `start_method()` says), yielded in task order.

    `work` goes to each worker pickled, so what it holds (an fsspec filesystem) is made afresh there, not
    inherited mid-state through fork. Chunk c goes to worker c % workers. Raises WorkerDied when a worker
    ends early (a kill -9, the OOM killer); the other workers are killed then, and on any other way out.
    """
    chunks = [tasks[i:i + chunksize] for i in range(0, len(tasks), chunksize)]
    fork = (start or start_method()) == "fork"
    ctx = multiprocessing.get_context("fork") if fork else multiprocessing.get_context("forkserver")
    procs: list[BaseProcess] = []
    sends: list[Connection] = []
    recvs: list[Connection] = []
    try:
        for _ in range(min(workers, len(chunks))):
            task_r, task_w = ctx.Pipe(duplex=False)
            result_r, result_w = ctx.Pipe(duplex=False)
            ours = [*sends, *recvs, task_w, result_r]
            worker = ctx.Process(target=serve, args=(task_r, result_w, ours), daemon=True)
            worker.start()
            procs.append(worker)
            task_r.close()
            result_w.close()
            send(task_w, worker, work)
            sends.append(task_w)
            recvs.append(result_r)
        n = len(procs)
        for c in range(min(len(chunks), n * IN_FLIGHT)):
            send(sends[c % n], procs[c % n], chunks[c])
        for c in range(len(chunks)):
            results = receive(recvs[c % n], procs[c % n], procs)
            if isinstance(results, BaseException):
                raise results
            if c + n * IN_FLIGHT < len(chunks):
                send(sends[c % n], procs[c % n], chunks[c + n * IN_FLIGHT])
            yield from results
        for conn, proc in zip(sends, procs):
            send(conn, proc, None)
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


def send(conn: Connection, proc: BaseProcess, message: object) -> None:
    try:
        conn.send(message)
    except BrokenPipeError:  # `proc` died
        proc.join()
        raise WorkerDied(how_it_ended(proc.exitcode)) from None


def receive(conn: Connection, proc: BaseProcess, procs: list[BaseProcess]) -> list | BaseException:
    """The next chunk's results (or its exception) from `proc` on `conn`, or WorkerDied as soon as any worker
    has ended: none ends before its last chunk is answered, so an end is a death."""
    ready = wait([conn, *(p.sentinel for p in procs)])
    if conn in ready:
        try:
            return conn.recv()
        except (EOFError, OSError):  # its worker died between messages (EOFError) or mid-message (OSError)
            dead = proc
    else:
        dead = next(p for p in procs if p.sentinel in ready)
    dead.join()
    raise WorkerDied(how_it_ended(dead.exitcode))


def how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def serve(tasks: Connection, results: Connection, inherited: list[Connection]) -> None:
    """A worker: `work` first, then chunks until None (or the parent's end of file)."""
    # Stopping the process group (Prefect, a terminal's Ctrl-C) ends workers quietly; the parent reports it.
    # A SIGTERM handler inherited from the parent (Prefect's raises TerminationSignal) would print a traceback.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for conn in inherited:  # the parent's ends: held here too, they would hide the parent's death from us
        conn.close()
    try:
        work = tasks.recv()
        while (chunk := tasks.recv()) is not None:
            try:
                results.send([work(t) for t in chunk])
            except Exception as e:  # raised again in the parent, as ProcessPoolExecutor does
                results.send(e)
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone
