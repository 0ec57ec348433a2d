"""Thread settings for a block of code: torch's intra-op thread count, the GIL's switch interval."""

from __future__ import annotations

import contextlib
import sys

import torch

__all__ = ["GIL_SWITCH_SECONDS", "gil_switch_interval", "intra_op_threads"]

GIL_SWITCH_SECONDS = 0.0002  # measure's switch interval (CPython's default: 0.005)


@contextlib.contextmanager
def intra_op_threads(k: int):
    """torch's intra-op thread count set to k for the block, then restored. Code made of many
    small tensor operations runs fastest with k = 1: more threads add synchronisation, and on a
    busy machine their spin-waits cost an order of magnitude (measured on the exact engine:
    10x slower with 2 threads while other processes held the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def gil_switch_interval(seconds: float = GIL_SWITCH_SECONDS):
    """CPython's switch interval at most ``seconds`` for the block, then restored.

    A thread that returns from a tensor operation or a compiled kernel (which run without the
    GIL) waits for the GIL until its holder gives it up, at the latest after the switch
    interval. With several threads that each alternate between short Python stretches and such
    calls, and one of them holding the GIL for long stretches (the exact engine), the default
    5 ms makes the others wait far longer than they compute: in measure, 0.2 ms cut the wall
    time of a 300,000-trajectory run by about a fifth on 2 cores (docs/benchmarks.md)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)
