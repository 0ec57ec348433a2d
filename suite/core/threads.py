"""torch's intra-op thread count for a block of code."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["intra_op_threads"]


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
