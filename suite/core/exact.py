"""Exact objective, gradient and value tables of a finite-horizon discounted MDP, in float64.

    J(theta) = E[ sum_{t=0}^{H-1} gamma^t r_t ]
    Q_t(s,a) = r(s,a) + gamma sum_s' P(s'|s,a) [not terminated] V_{t+1}(s'),   V_H = 0
    V_t(s)   = sum_a pi(a|s) Q_t(s,a),   J = rho0 . V_0
    d_0 = rho0,   d_{t+1}(s') = sum_{s,a} d_t(s) pi(a|s) P(s'|s,a) [not terminated]

grad J comes from autograd through the backward recursion; ``pgt_gradient`` evaluates the
finite-horizon policy gradient theorem  sum_t gamma^t sum_s d_t(s) sum_a grad pi(a|s) Q_t(s,a)
as an independent check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError
from .limits import check_limit
from .mdp import MDP
from .policies import Policy

__all__ = ["ExactSolution", "check_gamma_horizon", "objective", "occupancy", "optimal_return",
           "pgt_gradient", "solve"]


@dataclass(frozen=True)
class ExactSolution:
    """Everything exact about one (MDP, policy, gamma, H); float64 throughout."""

    J: float  # the objective
    grad: Tensor  # [P] dJ/dtheta over the policy's parameters
    pi: Tensor  # [S, A] pi(a|s)
    Q: Tensor  # [H, S, A] Q_t(s, a)
    V: Tensor  # [H+1, S] V_t(s), V_H = 0
    d: Tensor  # [H, S] P(s_t = s and the episode has not ended before t)
    gamma: float
    horizon: int

    @property
    def advantage(self) -> Tensor:
        """A_t(s, a) = Q_t(s, a) - V_t(s), shape [H, S, A]."""
        return self.Q - self.V[:-1, :, None]

    @property
    def grad_norm(self) -> float:
        return float(self.grad.norm())

    def to(self, device: torch.device | str) -> ExactSolution:
        """The same solution with its tensors on ``device``."""
        return dataclasses.replace(self, **{k: getattr(self, k).to(device)
                                            for k in ("grad", "pi", "Q", "V", "d")})


def check_gamma_horizon(gamma: float, horizon: int) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise InputError(f"gamma must lie in [0, 1], got {gamma}")
    if int(horizon) != horizon or horizon < 1:
        raise InputError(f"horizon must be an integer >= 1, got {horizon}")
    check_limit("horizon", int(horizon), "the horizon")


def _backward(mdp: MDP, pi: Tensor, gamma: float, horizon: int) -> tuple[Tensor, Tensor]:
    """Q [H, S, A] and V [H+1, S] by the finite-horizon Bellman recursion (differentiable in pi)."""
    succ, r = mdp.successors, mdp.expected_reward()
    V = [torch.zeros(mdp.n_states, dtype=torch.float64)]
    Q = []
    for _ in range(horizon):
        q = r + gamma * succ.expect(V[-1])
        Q.append(q)
        V.append((pi * q).sum(-1))
    return torch.stack(Q[::-1]), torch.stack(V[::-1])


def occupancy(mdp: MDP, pi: Tensor, horizon: int, rho0: Tensor | None = None) -> Tensor:
    """d [H, S]: probability of being in s at t with the episode still running, from rho0
    (default the MDP's)."""
    succ = mdp.successors
    flow = pi[:, :, None] * succ.prob * (~succ.terminated)  # [S, A, K]
    d = [mdp.rho0 if rho0 is None else rho0]
    for _ in range(horizon - 1):
        mass = d[-1][:, None, None] * flow
        d.append(torch.zeros_like(d[-1]).index_add_(0, succ.next_state.reshape(-1),
                                                      mass.reshape(-1)))
    return torch.stack(d)


def objective(mdp: MDP, policy: Policy, gamma: float, horizon: int,
              params: Tensor | None = None) -> Tensor:
    """J(theta) as a differentiable scalar tensor."""
    _, V = _backward(mdp, policy.probs(params), gamma, horizon)
    return mdp.rho0 @ V[0]


def solve(mdp: MDP, policy: Policy, gamma: float, horizon: int) -> ExactSolution:
    """J, grad J (autograd), Q_t, V_t and d_t for the policy's current parameters."""
    check_gamma_horizon(gamma, horizon)
    if (policy.n_states, policy.n_actions) != (mdp.n_states, mdp.n_actions):
        raise InputError(
            f"policy is for S={policy.n_states}, A={policy.n_actions} but the environment has "
            f"S={mdp.n_states}, A={mdp.n_actions}"
        )
    theta = policy.params.detach().clone().requires_grad_(True)
    pi = policy.probs(theta)
    Q, V = _backward(mdp, pi, gamma, horizon)
    J = mdp.rho0 @ V[0]
    (grad,) = torch.autograd.grad(J, theta)
    pi = pi.detach()
    return ExactSolution(
        J=float(J.detach()), grad=grad, pi=pi, Q=Q.detach(), V=V.detach(),
        d=occupancy(mdp, pi, horizon), gamma=float(gamma), horizon=int(horizon),
    )


def pgt_gradient(sol: ExactSolution, policy: Policy) -> Tensor:
    """sum_t gamma^t sum_s d_t(s) sum_a grad pi(a|s) Q_t(s,a): the theorem, evaluated directly."""
    discount = sol.gamma ** torch.arange(sol.horizon, dtype=torch.float64)
    weight = (discount[:, None, None] * sol.d[:, :, None] * sol.Q).sum(0)  # [S, A]
    theta = policy.params.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((policy.probs(theta) * weight).sum(), theta)
    return grad


def optimal_return(mdp: MDP, gamma: float, horizon: int) -> float:
    """max over (non-stationary) policies of J, by finite-horizon dynamic programming."""
    check_gamma_horizon(gamma, horizon)
    succ, r = mdp.successors, mdp.expected_reward()
    V = torch.zeros(mdp.n_states, dtype=torch.float64)
    for _ in range(horizon):
        V = (r + gamma * succ.expect(V)).max(-1).values
    return float(mdp.rho0 @ V)
