"""What an estimator sees: one batch, the exact solution, and shared, cached quantities."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from suite.contraction import Contraction, Grads
from suite.exact import ExactSolution
from suite.sampler import Batch

__all__ = ["Context"]


@dataclass(frozen=True)
class Context:
    batch: Batch  # N trajectories, padded to T steps
    gamma: float
    exact: ExactSolution  # on the batch's device: Q [H,S,A], V [H+1,S], pi [S,A]
    contraction: Contraction  # indexed for this batch (contraction.for_batch(batch))
    batch_size: int  # B: trajectories i and j share a batch iff i // B == j // B
    generator: torch.Generator | None = None  # the estimators' own randomness

    @property
    def device(self) -> torch.device:
        return self.batch.rewards.device

    @property
    def T(self) -> int:
        return self.batch.rewards.shape[1]

    @cached_property
    def discount(self) -> Tensor:
        """gamma^t, shape [T] (gamma = 0 gives 1, 0, 0, ...)."""
        t = torch.arange(self.T, dtype=torch.float64, device=self.device)
        return torch.tensor(self.gamma, dtype=torch.float64, device=self.device) ** t

    @cached_property
    def reward_to_go(self) -> Tensor:
        """G_t = sum_{k >= t} gamma^(k-t) r_k, shape [N, T] (0 after the episode ended)."""
        r = self.batch.rewards
        G = torch.zeros_like(r)
        acc = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
        for t in range(self.T - 1, -1, -1):
            acc = r[:, t] + self.gamma * acc
            G[:, t] = acc
        return G

    @cached_property
    def steps(self) -> Tensor:
        """t for every entry, shape [N, T]."""
        return torch.arange(self.T, device=self.device).expand_as(self.batch.states)

    def value_at(self, V: Tensor) -> Tensor:
        """V[t, s_t] for a table V [>= T, S], shape [N, T]."""
        return V[self.steps, self.batch.states]

    def q_at(self, Q: Tensor) -> Tensor:
        """Q[t, s_t, a_t] for a table Q [>= T, S, A], shape [N, T]."""
        return Q[self.steps, self.batch.states, self.batch.actions]

    def next_value(self, V: Tensor) -> Tensor:
        """V[t+1, s_{t+1}] if step t+1 happened, else 0 (termination or horizon), shape [N, T]."""
        nxt = torch.zeros_like(self.batch.rewards)
        nxt[:, :-1] = self.value_at(V)[:, 1:] * self.batch.mask[:, 1:]
        return nxt

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

    def pi_grad(self, steps: Tensor) -> Grads:
        """X_i = sum_t sum_a c_it[a] grad pi(a|s_it), from steps [N, T, A]."""
        return self.contraction.pi_grad(steps)
