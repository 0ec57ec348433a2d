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

__all__ = ["inverse_cdf", "sum_to_go", "td_errors"]


def sum_to_go(x: Tensor, factor: float) -> Tensor:
    """y_t = sum_{k >= t} factor^(k-t) x_k along dim 1 of x [N, T] (factor = 0 returns x)."""
    if factor == 0:
        return x
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        out = torch.empty(x.shape, dtype=x.dtype)  # (the sums run in float64)
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


def inverse_cdf(q: Tensor, u: Tensor) -> Tensor:
    """t_i = the number of partial sums q_i0 + ... + q_it (t < T) that are <= u_i, for q [N, T]
    (non-negative) and u [N, 1]: the step drawn by the uniform u_i, T when u_i falls beyond
    the row's mass; [N, 1] int64. On the CPU one compiled pass per row that stops at the drawn
    step (the same sums in the same order as torch's cumsum), elsewhere cumsum + searchsorted."""
    if q.device.type == "cpu" and q.dtype == torch.float64 and u.dtype == torch.float64:
        out = torch.empty(q.shape[0], 1, dtype=torch.int64)
        _inverse_cdf(q.contiguous().numpy(), u.contiguous().numpy().reshape(-1),
                     out.numpy().reshape(-1))
        return out
    return torch.searchsorted(q.cumsum(1), u, right=True)


@numba.njit(nogil=True, cache=True)
def _inverse_cdf(q, u, out):  # pragma: no cover - compiled
    N, T = q.shape
    for i in range(N):
        acc = 0.0
        t = 0
        while t < T:
            acc += q[i, t]
            if acc > u[i]:
                break
            t += 1
        out[i] = t


def td_errors(rewards: Tensor, states: Tensor, lengths: Tensor, V: Tensor, gamma: float) -> Tensor:
    """delta_t = r_t + gamma V[t+1, s_{t+1}] - V[t, s_t] on the steps that happened (the
    bootstrap term 0 at an episode's last step: termination or the horizon), 0 after the end;
    rewards, states [N, T], lengths [N], a critic table V [>= T, S]. On the CPU one compiled
    pass, elsewhere torch."""
    if rewards.device.type == "cpu" and rewards.dtype in (torch.float32, torch.float64):
        out = torch.empty(rewards.shape, dtype=rewards.dtype)  # (computed in float64)
        _td_errors(rewards.numpy(), states.numpy(), lengths.numpy(),
                   V.to(torch.float64).contiguous().numpy(), float(gamma), out.numpy())
        return out
    return td_errors_torch(rewards, states, lengths, V, gamma)


def td_errors_torch(rewards: Tensor, states: Tensor, lengths: Tensor, V: Tensor,
                    gamma: float) -> Tensor:
    """The same with torch operations (any device)."""
    T = rewards.shape[1]
    mask = (torch.arange(T, device=rewards.device) < lengths[:, None]).to(rewards.dtype)
    S = V.shape[1]
    ts = torch.arange(T, device=rewards.device) * S + states  # [N, T] entry of V [T, S]
    v = V[:T].to(rewards.dtype).reshape(-1).index_select(0, ts.reshape(-1)).view(ts.shape) * mask
    nxt = torch.zeros_like(rewards)
    nxt[:, :-1] = v[:, 1:]  # 0 where step t+1 did not happen (masked above)
    return (rewards + gamma * nxt - v) * mask


@numba.njit(nogil=True, cache=True)
def _td_errors(r, states, lengths, V, gamma, out):  # pragma: no cover - compiled
    N, T = r.shape
    for i in range(N):
        L = lengths[i]
        if L > 0:
            v = V[0, states[i, 0]]
            for t in range(L - 1):
                nxt = V[t + 1, states[i, t + 1]]
                out[i, t] = r[i, t] + gamma * nxt - v
                v = nxt
            out[i, L - 1] = r[i, L - 1] - v  # the last step: no bootstrap
        for t in range(L, T):
            out[i, t] = 0.0


@numba.njit(nogil=True, cache=True)
def _backward_scan(x: np.ndarray, f: float, out: np.ndarray) -> None:  # pragma: no cover
    """Four rows at a time: each row's sum is a chain of dependent multiply-adds, so four
    independent chains keep the processor busy (about 3x faster than one row at a time)."""
    N, T = x.shape
    i = 0
    while i + 4 <= N:
        a0 = a1 = a2 = a3 = 0.0
        for t in range(T - 1, -1, -1):
            a0 = x[i, t] + f * a0
            a1 = x[i + 1, t] + f * a1
            a2 = x[i + 2, t] + f * a2
            a3 = x[i + 3, t] + f * a3
            out[i, t], out[i + 1, t], out[i + 2, t], out[i + 3, t] = a0, a1, a2, a3
        i += 4
    for k in range(i, N):
        acc = 0.0
        for t in range(T - 1, -1, -1):
            acc = x[k, t] + f * acc
            out[k, t] = acc
