"""Worker processes that stop when their parent is stopped.

``run_processes`` starts one spawned process per job and waits for them. When the parent is
interrupted (Ctrl-C, or SIGTERM turned into KeyboardInterrupt), it sends SIGTERM to the workers
still running, waits for them to mark their trials failed and their runs killed, kills the ones
that do not stop within ``STOP_WAIT`` seconds, and re-raises. No worker outlives the parent's
command, and none hangs: a worker that dies shows as a negative exit code.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from collections.abc import Callable, Sequence

__all__ = ["INTERRUPTED", "STOP_WAIT", "deferred_signals", "ignore_signals", "interrupt_on_sigterm",
           "run_processes", "stop"]

STOP_WAIT = 60.0  # seconds a stopped worker gets to clean up before it is killed
INTERRUPTED = 130  # exit code of a worker (and of the command) stopped by a signal


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> Callable[[], None]:
    """SIGTERM raises KeyboardInterrupt, like Ctrl-C (SIGINT); returns a function that puts
    back the handlers of both signals as they were."""
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_interrupt)}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def ignore_signals() -> None:
    """Called once a process has started cleaning up: a second signal must not cut it short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def deferred_signals():
    """SIGTERM and SIGINT wait until the block ends, then raise KeyboardInterrupt: a trial's
    commit and the closing of its runs are never cut in two. Main thread only."""
    caught: list[signal.Signals] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signal.Signals(signum)))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught and any(previous[s] != signal.SIG_IGN for s in caught):
        raise KeyboardInterrupt


def run_processes(target: Callable, jobs: Sequence[tuple], on_tick: Callable[[], None] | None = None,
                  tick: float = 1.0) -> list[int]:
    """Run ``target(*job)`` in one spawned process per job; return their exit codes (negative:
    killed by that signal). ``on_tick`` is called about every ``tick`` seconds while they run."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=job, name=f"worker-{i}") for i, job in enumerate(jobs)]
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=tick / len(procs))
            if on_tick:
                on_tick()
    except KeyboardInterrupt:
        stop(procs)
        raise
    return [_exit_code(p) for p in procs]


def _exit_code(p: multiprocessing.process.BaseProcess) -> int:
    if p.exitcode is None:  # not reached: every process has ended
        raise RuntimeError(f"{p.name} is still running")
    return p.exitcode


def stop(procs, wait: float = STOP_WAIT) -> None:
    """SIGTERM every live process, give them ``wait`` seconds together, then SIGKILL."""
    procs = [p for p in procs if p.pid is not None]  # started ones
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + wait
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
