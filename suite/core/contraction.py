"""From per-step weights to per-trajectory gradients, without autograd in the hot path.

Two forms of the same object, the per-trajectory gradients X [N, P]:

* ``RowGrads`` (tabular softmax): grad_theta log pi(a|s) = onehot(a) - pi(.|s) lives in row s
  of theta [S, A], so X_i is non-zero only on the states trajectory i visited. X is kept as one
  A-vector per visited (trajectory, state) pair: values [V, A]. Memory and work scale with the
  steps sampled, not with N x P (Taxi has P = 3000).
* ``DenseGrads`` (any differentiable policy): X = C @ J with C [N, S*A] the per-trajectory
  cotangent on the log-pi (or pi) table and J [S*A, P] its Jacobian (torch.func.jacrev), exact
  because the policy sees the state only through its index.

``Contraction.for_batch(batch)`` returns a ``BatchContraction`` indexed for one batch (piece); every
estimator then costs a scatter and a few passes over its values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Self

import torch
from torch import Tensor

from .policies import Policy
from .rows import (
    group_rows_sum,
    pi_rows_grad,
    pi_table_grad,
    rows_cross_fitted,
    rows_times_param,
    rows_times_traj,
    score_rows,
    visited_rows,
)
from .sampler import Batch

__all__ = ["BatchContraction", "Contraction", "DenseGrads", "Grads", "RowGrads", "SingleSteps"]


@dataclass(frozen=True)
class _Rows:
    """Visited (trajectory, state) pairs of one batch, and the map from steps to them."""

    step_row: Tensor  # [L] row of each sampled step (L = number of masked steps)
    row_traj: Tensor  # [V] trajectory of each row
    row_state: Tensor  # [V] state of each row
    n: int  # N trajectories
    S: int
    A: int
    _group_entries: dict = field(default_factory=dict, compare=False, repr=False)

    def row_sums(self, values: Tensor) -> Tensor:
        """[V] sums of the rows of values [V, A] (a matrix-vector product: faster than sum(1))."""
        return values @ torch.ones(self.A, dtype=values.dtype, device=values.device)

    def minus_pi_times_row_sums(self, values: Tensor, pi_rows: Tensor) -> Tensor:
        """values - pi(.|s) * (row sum), fused: the softmax score's projection of each row."""
        return torch.addcmul(values, pi_rows, self.row_sums(values)[:, None], value=-1.0)

    def group_entries(self, group: Tensor) -> Tensor:
        """[V*A] entry (group[row_traj], row_state, a) of each value in a flattened [G, S, A]
        table; cached per grouping (the statistics reuse one)."""
        hit = self._group_entries.get(id(group))
        if hit is None or hit[0] is not group:
            rows = group.index_select(0, self.row_traj) * self.S + self.row_state
            a = torch.arange(self.A, device=rows.device)
            hit = (group, (rows[:, None] * self.A + a).reshape(-1))
            self._group_entries[id(group)] = hit
        return hit[1]


@dataclass(frozen=True)
class SingleSteps:
    """A weighting with at most one step per trajectory: w_it = c_i at t = t_i, 0 elsewhere
    (t_i = -1: no step, c_i = 0). A drawn single step, kept sparse: the compiled kernels count
    it without the [N, T] tensor of zeros that ``weights`` builds."""

    t: Tensor  # [N] int64, the step of each trajectory, -1 where none
    c: Tensor  # [N] its weight

    def weights(self, T: int) -> Tensor:
        """The same weighting as a tensor [N, T]."""
        dense = torch.zeros(self.t.shape[0], T, dtype=self.c.dtype, device=self.c.device)
        return dense.scatter_(1, self.t.clamp(min=0)[:, None], self.c[:, None])


class Grads(ABC):
    """Per-trajectory gradients X [N, P] of one estimator on one batch (see module doc): the
    whole contract the statistics and the estimators rely on."""

    @property
    @abstractmethod
    def n(self) -> int:  # N trajectories
        ...

    @property
    @abstractmethod
    def device(self) -> torch.device:
        ...

    @abstractmethod
    def sq_norms(self) -> Tensor:  # [N] |X_i|^2
        ...

    @abstractmethod
    def group_sum(self, group: Tensor, n_groups: int) -> Tensor:  # [G, P] sums of X_i by group
        ...

    @abstractmethod
    def times_traj(self, c: Tensor) -> Self:  # X_i * c_i
        ...

    @abstractmethod
    def times_param(self, b: Tensor, group: Tensor) -> Self:  # X_i * b[group_i], b [G, P]
        ...

    @abstractmethod
    def __add__(self, other: Self) -> Self:  # X + Y, entry by entry (same batch)
        ...

    @abstractmethod
    def __sub__(self, other: Self) -> Self:
        ...

    @abstractmethod
    def square(self) -> Self:  # X * X, entry by entry
        ...

    def dense(self) -> Tensor:  # [N, P], for tests and small batches
        return self.group_sum(torch.arange(self.n, device=self.device), self.n)

    def cross_fitted(self, c: Tensor, fold: Tensor, n_folds: int) -> Grads:
        """X_ik (c_i - b_k(h')): per-parameter constant baselines fitted on the paired fold h'
        (folds 2m and 2m + 1 pair up), b_k(h) = sum_{i in h} X_ik^2 c_i / sum_{i in h} X_ik^2
        (0 where the fold has no X_ik). c [N], fold [N] < n_folds."""
        X2 = self.square()
        num = X2.times_traj(c).group_sum(fold, n_folds)
        den = X2.group_sum(fold, n_folds)
        b = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
        swapped = b.reshape(-1, 2, b.shape[1]).flip(1).reshape(b.shape)  # fold h gets h ^ 1's
        return self.times_traj(c) - self.times_param(swapped, fold)


@dataclass(frozen=True)
class RowGrads(Grads):
    values: Tensor  # [V, A] gradient entries of each visited (trajectory, state) row
    rows: _Rows

    @property
    def n(self) -> int:
        return self.rows.n

    @property
    def device(self) -> torch.device:
        return self.values.device

    def sq_norms(self) -> Tensor:
        out = torch.zeros(self.rows.n, dtype=self.values.dtype, device=self.values.device)
        return out.index_add_(0, self.rows.row_traj, self.rows.row_sums(self.values.square()))

    @property
    def _compiled(self) -> bool:
        """float64 on the CPU: one compiled pass per operation (suite.core.rows)."""
        return self.values.device.type == "cpu" and self.values.dtype == torch.float64

    def group_sum(self, group: Tensor, n_groups: int) -> Tensor:
        r = self.rows
        if self._compiled:
            return torch.from_numpy(group_rows_sum(
                self.values.contiguous().numpy(), r.row_traj.numpy(), r.row_state.numpy(),
                group.numpy(), n_groups, r.S))
        return torch.bincount(r.group_entries(group), self.values.reshape(-1),
                              n_groups * r.S * r.A).reshape(n_groups, r.S * r.A)

    def times_traj(self, c: Tensor) -> RowGrads:
        r = self.rows
        if self._compiled and c.is_floating_point():
            return RowGrads(torch.from_numpy(rows_times_traj(
                self.values.contiguous().numpy(), r.row_traj.numpy(),
                c.to(torch.float64).contiguous().numpy())), r)
        return RowGrads(self.values * c.index_select(0, r.row_traj)[:, None], r)

    def times_param(self, b: Tensor, group: Tensor) -> RowGrads:
        r = self.rows
        if self._compiled and b.is_floating_point():
            return RowGrads(torch.from_numpy(rows_times_param(
                self.values.contiguous().numpy(), r.row_traj.numpy(), r.row_state.numpy(),
                group.numpy(), b.reshape(b.shape[0], -1).to(torch.float64).contiguous().numpy())), r)
        at = group.index_select(0, r.row_traj) * r.S + r.row_state  # [V] row of the [G*S, A] table
        return RowGrads(self.values * b.reshape(-1, r.A).index_select(0, at), r)

    def cross_fitted(self, c: Tensor, fold: Tensor, n_folds: int) -> Grads:
        r = self.rows
        if self._compiled and c.is_floating_point():
            return RowGrads(torch.from_numpy(rows_cross_fitted(
                self.values.contiguous().numpy(), r.row_traj.numpy(), r.row_state.numpy(),
                c.to(torch.float64).contiguous().numpy(), fold.numpy(), n_folds, r.S)), r)
        return super().cross_fitted(c, fold, n_folds)

    def __add__(self, other: RowGrads) -> RowGrads:
        return RowGrads(self.values + other.values, self.rows)

    def __sub__(self, other: RowGrads) -> RowGrads:
        return RowGrads(self.values - other.values, self.rows)

    def square(self) -> RowGrads:
        return RowGrads(self.values**2, self.rows)


@dataclass(frozen=True)
class DenseGrads(Grads):
    values: Tensor  # [N, P]

    @property
    def n(self) -> int:
        return self.values.shape[0]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def sq_norms(self) -> Tensor:
        return (self.values**2).sum(1)

    def group_sum(self, group: Tensor, n_groups: int) -> Tensor:
        out = torch.zeros(n_groups, self.values.shape[1], dtype=self.values.dtype,
                          device=self.values.device)
        return out.index_add_(0, group, self.values)

    def times_traj(self, c: Tensor) -> DenseGrads:
        return DenseGrads(self.values * c[:, None])

    def times_param(self, b: Tensor, group: Tensor) -> DenseGrads:
        return DenseGrads(self.values * b[group])

    def __add__(self, other: DenseGrads) -> DenseGrads:
        return DenseGrads(self.values + other.values)

    def __sub__(self, other: DenseGrads) -> DenseGrads:
        return DenseGrads(self.values - other.values)

    def square(self) -> DenseGrads:
        return DenseGrads(self.values**2)


class Contraction:
    """What turning step weights into gradients needs of one policy: pi and, for a policy that is
    not tabular, the Jacobians of its log-pi and pi tables. ``for_batch`` indexes a batch."""

    def __init__(self, policy: Policy, device: torch.device):
        self.policy = policy
        self.S, self.A = policy.n_states, policy.n_actions
        theta = policy.params.detach()
        self.pi = policy.probs(theta).detach().to(device)  # [S, A]
        self.tabular = policy.tabular
        self.J_log: Tensor | None = None  # [S*A, P]
        self.J_pi: Tensor | None = None
        if not self.tabular:
            jac = torch.func.jacrev
            self.J_log = jac(lambda p: policy.log_probs(p).reshape(-1))(theta).to(device)
            self.J_pi = jac(lambda p: policy.probs(p).reshape(-1))(theta).to(device)

    def for_batch(self, batch: Batch) -> BatchContraction:
        """The contraction indexed for one batch's steps (shared by every estimator on it); self
        is left as it was, so threads may share it."""
        return BatchContraction(self, batch)


class BatchContraction:
    """Turns step weights (or per-step cotangents on pi) into Grads on one batch. The step and
    row indexes are built on first use (an estimator whose statistics are fused never needs
    them)."""

    def __init__(self, base: Contraction, batch: Batch):
        self.S, self.A, self.pi, self.tabular = base.S, base.A, base.pi, base.tabular
        self.J_log, self.J_pi = base.J_log, base.J_pi
        self.batch = batch
        self.mask = batch.mask
        # tabular on the CPU: the index work in compiled passes (suite.core.rows)
        self._compiled = base.tabular and batch.states.device.type == "cpu"

    @cached_property
    def _pi64(self):
        """pi [S, A] as a float64 NumPy array (for the compiled passes)."""
        return self.pi.to(torch.float64).contiguous().numpy()

    @cached_property
    def flat(self) -> Tensor:
        """[L] flat [N*T] positions of the sampled steps, in (trajectory, time) order: one
        nonzero per batch; every later selection is an index_select with it."""
        return self.mask.reshape(-1).nonzero().squeeze(1)

    @cached_property
    def step_traj(self) -> Tensor:  # [L]
        return self.flat // self.mask.shape[1]

    @cached_property
    def step_time(self) -> Tensor:  # [L]
        return self.flat % self.mask.shape[1]

    @cached_property
    def step_state(self) -> Tensor:  # [L]
        return self.steps_of(self.batch.states)

    @cached_property
    def _tabular_rows(self) -> tuple[_Rows, Tensor, Tensor]:
        """Rows = distinct (trajectory, state) keys, in key order; the [V, A] entry of each step;
        pi at each row [V, A]. On the CPU one compiled pass (suite.core.rows); elsewhere the
        keys are numbered through a dense flag map."""
        b = self.batch
        if self._compiled:
            step_row, slot, row_traj, row_state = (torch.from_numpy(x) for x in visited_rows(
                b.states.numpy(), b.actions.numpy(), b.lengths.numpy(), self.S, self.A))
        else:
            key = self.step_traj * self.S + self.step_state
            flags = torch.zeros(b.n * self.S, dtype=torch.bool, device=key.device)
            flags.index_fill_(0, key, True)
            step_row = (flags.cumsum(0) - 1).index_select(0, key)
            keys = flags.nonzero().squeeze(1)
            row_traj, row_state = keys // self.S, keys % self.S
            slot = step_row * self.A + self.steps_of(b.actions)
        rows = _Rows(step_row, row_traj, row_state, b.n, self.S, self.A)
        return rows, slot, self.pi.index_select(0, row_state)

    @property
    def rows(self) -> _Rows:
        return self._tabular_rows[0]

    @property
    def slot(self) -> Tensor:  # [L] entry of each step in the [V, A] table
        return self._tabular_rows[1]

    @property
    def pi_rows(self) -> Tensor:  # [V, A]
        return self._tabular_rows[2]

    def steps_of(self, x: Tensor) -> Tensor:
        """The sampled steps of x [N, T, ...], in the contraction's step order: [L, ...]."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.flat)

    def score(self, weights: Tensor) -> Grads:
        """X_i = sum_t w_it grad log pi(a_it|s_it), from weights [N, T] (entries past the end of
        an episode are ignored, whatever they hold); float64 whatever the weights' dtype."""
        if self.J_log is None and self._compiled:
            w64 = weights.to(torch.float64).contiguous().numpy()
            values = score_rows(w64, self.batch.lengths.numpy(), self.slot.numpy(),
                                self.rows.row_state.numpy(), self._pi64)
            return RowGrads(torch.from_numpy(values), self.rows)
        w = self.steps_of(weights).to(torch.float64)
        if self.J_log is None:  # tabular
            r = self.rows
            counts = torch.zeros(len(r.row_traj) * self.A, dtype=w.dtype, device=w.device)
            counts = counts.index_add_(0, self.slot, w).reshape(-1, self.A)
            return RowGrads(r.minus_pi_times_row_sums(counts, self.pi_rows), r)
        cot = torch.zeros(self.batch.n * self.S * self.A, dtype=w.dtype, device=w.device)
        idx = (self.step_traj * self.S + self.step_state) * self.A + self.steps_of(self.batch.actions)
        cot = cot.index_add_(0, idx, w).reshape(self.batch.n, -1)
        return DenseGrads(cot @ self.J_log)

    def pi_grad(self, c: Tensor) -> Grads:
        """X_i = sum_t sum_a c_it[a] grad pi(a|s_it), from cotangents at the sampled steps
        c [L, A], in step order (step_traj, step_time, step_state); float64 whatever c's dtype."""
        c = c.to(torch.float64)
        if self.J_pi is None and self._compiled:
            r = self.rows
            values = pi_rows_grad(c.contiguous().numpy(), r.step_row.numpy(),
                                  r.row_state.numpy(), self._pi64)
            return RowGrads(torch.from_numpy(values), r)
        if self.J_pi is None:  # tabular
            r = self.rows
            acc = torch.zeros(len(r.row_traj), self.A, dtype=c.dtype, device=c.device)
            weighted = self.pi_rows * acc.index_add_(0, r.step_row, c)
            return RowGrads(r.minus_pi_times_row_sums(weighted, self.pi_rows), r)
        cot = torch.zeros(self.batch.n * self.S, self.A, dtype=c.dtype, device=c.device)
        cot = cot.index_add_(0, self.step_traj * self.S + self.step_state, c)
        return DenseGrads(cot.reshape(self.batch.n, -1) @ self.J_pi)

    def pi_grad_table(self, D: Tensor) -> Grads:
        """X_i = sum_t sum_a D[t, s_it, a] grad pi(a|s_it), from a table D [>= T, S, A] (the
        cotangents of pi_grad, looked up by (t, s_t): on the CPU read in the same pass); float64."""
        if self.J_pi is None and self._compiled:
            r, b = self.rows, self.batch
            values = pi_table_grad(D.to(torch.float64).contiguous().numpy(), b.states.numpy(),
                                   b.lengths.numpy(), r.step_row.numpy(), r.row_state.numpy(),
                                   self._pi64)
            return RowGrads(torch.from_numpy(values), r)
        A = D.shape[-1]
        at = self.step_time * self.S + self.step_state  # [L] row of the [T*S, A] table
        return self.pi_grad(D.reshape(-1, A).index_select(0, at))

