"""Discounted sums to go along the time axis: y_t = sum_{k >= t} f^(k-t) x_k for x [N, T].

On the CPU one compiled backward pass per row, y_t = x_t + f y_{t+1} (numba); elsewhere a reverse
cumulative sum of f^k x_k divided by f^t while f^(T-1) stays far from underflow (each partial sum
holds only terms k >= t, so the relative error stays at float64 round-off), else one product with
the upper-triangular [T, T] matrix of f^(k-t). The two agree to float64 rounding
(tests/test_fused.py).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["sum_to_go"]


def sum_to_go(x: Tensor, factor: float) -> Tensor:
    """y_t = sum_{k >= t} factor^(k-t) x_k along dim 1 of x [N, T] (factor = 0 returns x)."""
    if factor == 0:
        return x
    if x.device.type == "cpu" and x.dtype == torch.float64:
        out = torch.empty(x.shape, dtype=x.dtype)
        _backward_scan(x.contiguous().numpy(), float(factor), out.numpy())
        return out
    return sum_to_go_torch(x, factor)


def sum_to_go_torch(x: Tensor, factor: float) -> Tensor:
    """The same with torch operations (any device)."""
    if factor == 0:
        return x
    T = x.shape[1]
    if factor > 0 and (T - 1) * math.log(factor) > -500:
        powers = factor ** torch.arange(T, dtype=x.dtype, device=x.device)
        return (x * powers).flip(1).cumsum(1).flip(1) / powers
    t = torch.arange(T, device=x.device)
    lag = t[:, None] - t[None, :]  # k - t for row k, column t
    base = torch.tensor(factor, dtype=x.dtype, device=x.device)
    kernel = torch.where(lag >= 0, base ** lag.clamp(min=0).to(x.dtype),
                         torch.zeros((), dtype=x.dtype, device=x.device))
    return x @ kernel


@numba.njit(nogil=True, cache=True)
def _backward_scan(x: np.ndarray, f: float, out: np.ndarray) -> None:  # pragma: no cover
    N, T = x.shape
    for i in range(N):
        acc = 0.0
        for t in range(T - 1, -1, -1):
            acc = x[i, t] + f * acc
            out[i, t] = acc
