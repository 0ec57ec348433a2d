"""The finite MDP model shared by the exact solver and the sampler."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["MDP", "PROB_TOL", "Successors"]

PROB_TOL = 1e-9  # rows of P must sum to 1 within this


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (tensors inside)
class MDP:
    """A finite MDP with episode termination.

    A transition (s, a, s') flagged ``terminated`` pays R[s, a, s'] and then ends the episode: the
    process moves into an absorbing, zero-reward sink that has no policy parameters. The sink is
    implicit: the exact solver drops the terminated probability mass and the sampler masks the
    steps after termination, so every tensor here is over the environment's own S states.
    """

    P: Tensor  # [S, A, S'] float64, P(s'|s,a); each row sums to 1
    R: Tensor  # [S, A, S'] float64, reward of the transition s,a -> s'
    terminated: Tensor  # [S, A, S'] bool, the transition ends the episode
    rho0: Tensor  # [S] float64, initial state distribution
    name: str = "mdp"

    def __post_init__(self) -> None:
        check_model(self.P, self.R, self.terminated, self.rho0, self.name)

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]

    def expected_reward(self) -> Tensor:
        """r(s, a) = sum_s' P(s'|s,a) R(s,a,s'), shape [S, A]."""
        return (self.P * self.R).sum(-1)

    def continuing_P(self) -> Tensor:
        """P(s'|s,a) restricted to transitions that do not terminate, shape [S, A, S']."""
        return self.P * (~self.terminated)

    @cached_property
    def successors(self) -> Successors:
        """The sparse view of P used by the solver and the sampler (K = most successors of any s,a)."""
        K = max(int((self.P > 0).sum(-1).max()), 1)
        prob, next_state = torch.topk(self.P, K, dim=-1)  # largest first; padding has prob 0
        return Successors(
            next_state=next_state,
            prob=prob,
            reward=torch.gather(self.R, -1, next_state),
            terminated=torch.gather(self.terminated, -1, next_state),
        )


@dataclass(frozen=True)
class Successors:
    """For each (s, a) its K possible successors, padded with probability-0 entries."""

    next_state: Tensor  # [S, A, K] int64
    prob: Tensor  # [S, A, K] float64
    reward: Tensor  # [S, A, K] float64, R(s, a, next_state)
    terminated: Tensor  # [S, A, K] bool

    def to(self, device: torch.device | str) -> Successors:
        return Successors(*(t.to(device) for t in (self.next_state, self.prob, self.reward,
                                                  self.terminated)))

    def expect(self, values: Tensor) -> Tensor:
        """sum_s' P(s'|s,a) [not terminated] values[s'], shape [S, A] (differentiable)."""
        weights = self.prob * (~self.terminated)
        return (weights * values[self.next_state]).sum(-1)


def check_model(P: Tensor, R: Tensor, terminated: Tensor, rho0: Tensor, source: str) -> None:
    """Raise InputError naming the rule broken by (P, R, terminated, rho0)."""
    if P.ndim != 3 or P.shape[0] != P.shape[2]:
        raise InputError(f"{source}: P must have shape [S, A, S], got {list(P.shape)}")
    S, A, _ = P.shape
    if S < 1 or A < 1:
        raise InputError(f"{source}: need at least one state and one action, got S={S}, A={A}")
    for label, tensor in (("R", R), ("terminated", terminated)):
        if tuple(tensor.shape) != (S, A, S):
            raise InputError(
                f"{source}: {label} must have the shape of P {[S, A, S]}, got {list(tensor.shape)}"
            )
    if tuple(rho0.shape) != (S,):
        raise InputError(f"{source}: rho0 must have shape [{S}], got {list(rho0.shape)}")
    if P.dtype != torch.float64 or R.dtype != torch.float64 or rho0.dtype != torch.float64:
        raise InputError(f"{source}: P, R and rho0 must be float64 tensors")
    if terminated.dtype != torch.bool:
        raise InputError(f"{source}: terminated must be a bool tensor, got {terminated.dtype}")
    for label, tensor in (("P", P), ("R", R), ("rho0", rho0)):
        if not torch.isfinite(tensor).all():
            raise InputError(f"{source}: {label} has non-finite entries; every value must be finite")
    if (P < 0).any():
        raise InputError(f"{source}: P has negative probabilities (min {P.min().item():.3g})")
    if (rho0 < 0).any():
        raise InputError(f"{source}: rho0 has negative probabilities (min {rho0.min().item():.3g})")
    row_err = (P.sum(-1) - 1).abs()
    if (row_err > PROB_TOL).any():
        s, a = divmod(int(row_err.argmax()), A)
        raise InputError(
            f"{source}: rows of P must sum to 1 within {PROB_TOL:g}; P[{s}, {a}, :] sums to "
            f"{P[s, a].sum().item():.12g}"
        )
    if abs(rho0.sum().item() - 1) > PROB_TOL:
        raise InputError(
            f"{source}: rho0 must sum to 1 within {PROB_TOL:g}, got {rho0.sum().item():.12g}"
        )
