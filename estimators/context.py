"""What an estimator sees: one batch, the exact solution, and shared, cached quantities."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from suite.core.contraction import BatchContraction, Grads
from suite.core.exact import ExactSolution
from suite.core.mdp import MDP
from suite.core.sampler import Batch
from suite.core.scan import sum_to_go, td_errors

__all__ = ["Context"]


@dataclass(frozen=True)
class Context:
    batch: Batch  # N trajectories, padded to T steps
    gamma: float
    exact: ExactSolution  # on the batch's device: Q [H,S,A], V [H+1,S], pi [S,A]
    contraction: BatchContraction  # this batch's steps (Contraction(policy, device).for_batch(batch))
    batch_size: int  # B: trajectories i and j share a batch iff i // B == j // B
    generator: torch.Generator | None = None  # the estimators' own randomness
    mdp: MDP | None = None  # the model, for estimators that roll out more (remax's greedy baseline)
    problem_cache: dict | None = None  # shared by every batch of one measurement (see ``shared``)
    # the estimators' arithmetic: float64 by default (the tests' exact enumeration); measure
    # uses float32 on the CPU (its sums and the gradients stay float64: docs/benchmarks.md)
    dtype: torch.dtype = torch.float64

    @cached_property
    def cache(self) -> dict:
        """Scratch space for quantities several estimators share on this batch."""
        return {}

    @property
    def shared(self) -> dict:
        """Scratch space for quantities of the problem alone (MDP, policy, gamma, horizon), kept
        from batch to batch when the measurement passes ``problem_cache``; else this batch's."""
        return self.problem_cache if self.problem_cache is not None else self.cache

    @property
    def device(self) -> torch.device:
        return self.batch.rewards.device

    @property
    def T(self) -> int:
        return self.batch.rewards.shape[1]

    @cached_property
    def rewards(self) -> Tensor:
        """r_t, shape [N, T] (0 after the end of the episode), in ``dtype``."""
        return self.batch.rewards.to(self.dtype)

    @cached_property
    def mask(self) -> Tensor:
        """1.0 where step t happened, 0.0 after the end of the episode, shape [N, T]."""
        return self.batch.mask.to(self.dtype)

    @cached_property
    def ones(self) -> Tensor:
        """1.0 everywhere, shape [N, T] (as weights: sum_t grad log pi, the score)."""
        return torch.ones_like(self.rewards)

    @cached_property
    def discount(self) -> Tensor:
        """gamma^t, shape [T] (gamma = 0 gives 1, 0, 0, ...)."""
        t = torch.arange(self.T, dtype=torch.float64, device=self.device)
        return (torch.tensor(self.gamma, dtype=torch.float64, device=self.device) ** t) \
            .to(self.dtype)

    def discounted_sum_to_go(self, x: Tensor, factor: float) -> Tensor:
        """y_t = sum_{k >= t} factor^(k-t) x_k for x [N, T] (suite.core.scan.sum_to_go: one
        backward pass per row on the CPU). factor = 0 returns x itself."""
        return sum_to_go(x, factor)

    @cached_property
    def reward_to_go(self) -> Tensor:
        """G_t = sum_{k >= t} gamma^(k-t) r_k, shape [N, T] (0 after the episode ended)."""
        return self.discounted_sum_to_go(self.rewards, self.gamma)

    @cached_property
    def _ts(self) -> Tensor:
        """t * S + s_t, shape [N, T]: flat index into a [T, S] table."""
        t = torch.arange(self.T, device=self.device)
        return self.batch.states + t * self.exact.pi.shape[0]

    @staticmethod
    def take(table: Tensor, index: Tensor) -> Tensor:
        """table.reshape(-1)[index] for an integer index of any shape (an index_select: on the
        CPU several times faster than advanced indexing)."""
        return table.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)

    def value_at(self, V: Tensor) -> Tensor:
        """V[t, s_t] for a table V [>= T, S], shape [N, T] (cached per table)."""
        key = ("value_at", id(V))
        if key not in self.cache:
            self.cache[key] = (V, self.take(V[: self.T].to(self.dtype), self._ts))
        return self.cache[key][1]

    def q_at(self, Q: Tensor) -> Tensor:
        """Q[t, s_t, a_t] for a table Q [>= T, S, A], shape [N, T] (cached per table)."""
        key = ("q_at", id(Q))
        if key not in self.cache:
            A = Q.shape[-1]
            self.cache[key] = (Q, self.take(Q[: self.T].to(self.dtype),
                                            self._ts * A + self.batch.actions))
        return self.cache[key][1]

    def td_errors(self, V: Tensor) -> Tensor:
        """delta_t = r_t + gamma V[t+1, s_{t+1}] - V[t, s_t] for a critic table V [>= T+1, S],
        the bootstrap 0 where step t+1 did not happen, delta 0 after the end; [N, T] (cached per
        table)."""
        key = ("td_errors", id(V))
        if key not in self.cache:
            b = self.batch
            self.cache[key] = (V, td_errors(self.rewards, b.states, b.lengths, V, self.gamma))
        return self.cache[key][1]

    def grouped(self, x: Tensor) -> Tensor:
        """x [N, ...] viewed as [M, B, ...], one row per batch: batch statistics then broadcast
        without materialising them for every member."""
        return x.view(-1, self.batch_size, *x.shape[1:])

    def batch_sum(self, x: Tensor) -> Tensor:
        """sum over each trajectory's batch, broadcast back: shape of x [N, ...]."""
        B = self.batch_size
        grouped = x.reshape(-1, B, *x.shape[1:])
        return grouped.sum(1, keepdim=True).expand_as(grouped).reshape(x.shape)

    @cached_property
    def half(self) -> Tensor:
        """Cross-fitting fold of each trajectory: 2 * batch + (second half of the batch), [N]."""
        i = torch.arange(self.batch.n, device=self.device)
        B = self.batch_size
        return 2 * (i // B) + (i % B >= B // 2).long()

    @cached_property
    def other_half(self) -> Tensor:
        """The fold a trajectory's cross-fitted quantities are fitted on, shape [N]."""
        return self.half ^ 1

    @property
    def n_halves(self) -> int:
        return 2 * (self.batch.n // self.batch_size)

    def score(self, weights: Tensor) -> Grads:
        """X_i = sum_t w_it grad log pi(a_it|s_it)."""
        return self.contraction.score(weights)

    def pi_grad(self, c: Tensor) -> Grads:
        """X_i = sum_t sum_a c_it[a] grad pi(a|s_it), from c [L, A] at the sampled steps
        (in the order of step_time / step_state)."""
        return self.contraction.pi_grad(c)

    def pi_grad_table(self, D: Tensor) -> Grads:
        """X_i = sum_t sum_a D[t, s_it, a] grad pi(a|s_it), from a table D [>= T, S, A] (pi_grad
        with the cotangents looked up by time and state)."""
        return self.contraction.pi_grad_table(D)

    def steps_of(self, x: Tensor) -> Tensor:
        """x [N, T, ...] at the sampled steps, [L, ...] in step order."""
        return self.contraction.steps_of(x)

    @property
    def step_traj(self) -> Tensor:
        """Trajectory of each sampled step, [L]."""
        return self.contraction.step_traj

    @property
    def step_time(self) -> Tensor:
        """t of each sampled step, [L] (L = number of steps that happened)."""
        return self.contraction.step_time

    @property
    def step_state(self) -> Tensor:
        """s_t of each sampled step, [L]."""
        return self.contraction.step_state
