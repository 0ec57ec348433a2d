"""Compiled (numba) forms of the tabular contraction's index work, for batches on the CPU.

``contraction.BatchContraction`` keeps one A-vector per visited (trajectory, state) pair. On the
CPU, numbering those rows with torch takes a nonzero, a cumulative sum and several gathers, and
the per-step scatters into [V, A] run one element at a time; here each is one pass over the
steps. The rows come out in the order of the torch code (trajectory, then state ascending) and
the values agree with it to float64 rounding (tests/test_contraction.py).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["group_rows_sum", "pi_rows_grad", "pi_table_grad", "rows_cross_fitted",
           "rows_times_param", "rows_times_traj",
           "score_rows", "visited_rows"]


@numba.njit(nogil=True, cache=True)
def visited_rows(states, actions, lengths, S, A):  # pragma: no cover - compiled
    """The rows of a batch (states, actions [N, T], lengths [N]): (step_row [L], slot [L] =
    step_row * A + a_t, row_traj [V], row_state [V]), steps in (trajectory, time) order, rows in
    (trajectory, state) order."""
    N = states.shape[0]
    L = 0
    for i in range(N):
        L += lengths[i]
    step_row = np.empty(L, dtype=np.int64)
    slot = np.empty(L, dtype=np.int64)
    row_traj = np.empty(L, dtype=np.int64)
    row_state = np.empty(L, dtype=np.int64)
    row_of = np.full(S, -1, dtype=np.int64)  # row of state s in the current trajectory
    seen = np.empty(S, dtype=np.int64)
    l, v = 0, 0
    for i in range(N):
        k = 0
        for t in range(lengths[i]):
            s = states[i, t]
            if row_of[s] < 0:
                row_of[s] = 0
                j = k  # insertion sort: the trajectory's distinct states, ascending
                while j > 0 and seen[j - 1] > s:
                    seen[j] = seen[j - 1]
                    j -= 1
                seen[j] = s
                k += 1
        for q in range(k):
            s = seen[q]
            row_of[s] = v
            row_traj[v] = i
            row_state[v] = s
            v += 1
        for t in range(lengths[i]):
            r = row_of[states[i, t]]
            step_row[l] = r
            slot[l] = r * A + actions[i, t]
            l += 1
        for q in range(k):
            row_of[seen[q]] = -1
    return step_row, slot, row_traj[:v].copy(), row_state[:v].copy()


@numba.njit(nogil=True, cache=True)
def score_rows(w, lengths, slot, row_state, pi):  # pragma: no cover - compiled
    """X [V, A] of sum_t w_it grad log pi(a_it|s_it): the weights added at each step's slot,
    then each row minus pi(.|s) times its sum. w [N, T] float64."""
    V, A = row_state.shape[0], pi.shape[1]
    out = np.zeros((V, A))
    flat = out.reshape(-1)
    l = 0
    for i in range(w.shape[0]):
        for t in range(lengths[i]):
            flat[slot[l]] += w[i, t]
            l += 1
    _project(out, row_state, pi)
    return out


@numba.njit(nogil=True, cache=True)
def pi_rows_grad(c, step_row, row_state, pi):  # pragma: no cover - compiled
    """X [V, A] of sum_t sum_a c_t[a] grad pi(a|s_t), from c [L, A] at the steps."""
    V, A = row_state.shape[0], pi.shape[1]
    out = np.zeros((V, A))
    for l in range(c.shape[0]):
        r = step_row[l]
        for a in range(A):
            out[r, a] += c[l, a]
    _pi_project(out, row_state, pi)
    return out


@numba.njit(nogil=True, cache=True)
def pi_table_grad(D, states, lengths, step_row, row_state, pi):  # pragma: no cover - compiled
    """X [V, A] of sum_t sum_a D[t, s_t, a] grad pi(a|s_t), from a table D [>= T, S, A]."""
    V, A = row_state.shape[0], pi.shape[1]
    out = np.zeros((V, A))
    l = 0
    for i in range(states.shape[0]):
        for t in range(lengths[i]):
            r, s = step_row[l], states[i, t]
            for a in range(A):
                out[r, a] += D[t, s, a]
            l += 1
    _pi_project(out, row_state, pi)
    return out


@numba.njit(nogil=True, cache=True)
def _pi_project(x, row_state, pi):  # pragma: no cover - compiled
    """x[r, .] = pi(.|s_r) x[r, .], then projected (grad pi = pi times the score)."""
    for r in range(x.shape[0]):
        s = row_state[r]
        for a in range(pi.shape[1]):
            x[r, a] *= pi[s, a]
    _project(x, row_state, pi)


@numba.njit(nogil=True, cache=True)
def group_rows_sum(values, row_traj, row_state, group, n_groups, S):  # pragma: no cover
    """[G, S * A] sums of the rows by group of their trajectory (rows added in order)."""
    A = values.shape[1]
    out = np.zeros((n_groups, S * A))
    for r in range(values.shape[0]):
        g, j = group[row_traj[r]], row_state[r] * A
        for a in range(A):
            out[g, j + a] += values[r, a]
    return out


@numba.njit(nogil=True, cache=True)
def rows_times_traj(values, row_traj, c):  # pragma: no cover - compiled
    """values[r, a] * c[trajectory of row r]."""
    out = np.empty_like(values)
    for r in range(values.shape[0]):
        x = c[row_traj[r]]
        for a in range(values.shape[1]):
            out[r, a] = values[r, a] * x
    return out


@numba.njit(nogil=True, cache=True)
def rows_times_param(values, row_traj, row_state, group, b):  # pragma: no cover - compiled
    """values[r, a] * b[group of row r's trajectory, (state of row r) * A + a], b [G, S * A]."""
    A = values.shape[1]
    out = np.empty_like(values)
    for r in range(values.shape[0]):
        g, j = group[row_traj[r]], row_state[r] * A
        for a in range(A):
            out[r, a] = values[r, a] * b[g, j + a]
    return out


@numba.njit(nogil=True, cache=True)
def rows_cross_fitted(values, row_traj, row_state, c, fold, n_folds, S):  # pragma: no cover
    """Grads.cross_fitted on rows: the folds' sums of X^2 c and X^2, then
    X (c - b(paired fold)), in the operations and order of the generic version."""
    V, A = values.shape
    num = np.zeros((n_folds, S * A))
    den = np.zeros((n_folds, S * A))
    for r in range(V):
        f, j, ci = fold[row_traj[r]], row_state[r] * A, c[row_traj[r]]
        for a in range(A):
            x2 = values[r, a] ** 2
            num[f, j + a] += x2 * ci
            den[f, j + a] += x2
    out = np.empty_like(values)
    for r in range(V):
        f, j, ci = fold[row_traj[r]] ^ 1, row_state[r] * A, c[row_traj[r]]
        for a in range(A):
            d = den[f, j + a]
            b = num[f, j + a] / max(d, 1e-300) if d > 0 else 0.0
            out[r, a] = values[r, a] * ci - values[r, a] * b
    return out


@numba.njit(nogil=True, cache=True)
def _project(x, row_state, pi):  # pragma: no cover - compiled
    """x[r, .] -= pi(.|s_r) * sum_a x[r, a], in place (the softmax score's projection)."""
    A = pi.shape[1]
    for r in range(x.shape[0]):
        s = row_state[r]
        total = 0.0
        for a in range(A):
            total += x[r, a]
        for a in range(A):
            x[r, a] -= pi[s, a] * total
