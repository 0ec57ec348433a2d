"""The "trained" policy: exact gradient ascent stopped at a fraction of the way to the optimum."""

from __future__ import annotations

import functools

import torch

from ..core.errors import InputError
from ..core.exact import objective, optimal_return
from ..core.mdp import MDP
from ..core.policies import Policy, uniform

__all__ = ["trained_policy"]


def trained_policy(mdp: MDP, gamma: float, horizon: int, fraction: float = 0.5,
                   lr: float = 0.1, max_steps: int = 20000) -> Policy:
    """Tabular softmax policy whose return is J_u + fraction (J* - J_u).

    J_u is the uniform policy's return and J* the optimal return (finite-horizon dynamic
    programming, non-stationary policies allowed). From zero logits, Adam (learning rate ``lr``)
    ascends the exact gradient; the first step that crosses the target is bisected so that the
    returned policy hits the target to 1e-10 of (J* - J_u). A stationary policy cannot always reach
    J*: a fraction it cannot reach within ``max_steps`` is an error that says how far it got.
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"trained policy: fraction must lie in [0, 1), got {fraction}")
    logits = _trained_logits(mdp, float(gamma), int(horizon), float(fraction), float(lr),
                             int(max_steps))
    start = uniform(mdp.n_states, mdp.n_actions)
    return start.with_params(logits, name=f"trained:fraction={fraction}")


def _trained_logits(mdp: MDP, gamma: float, horizon: int, fraction: float, lr: float,
                    max_steps: int) -> torch.Tensor:
    return _ascent(mdp, gamma, horizon, lr).logits(fraction, max_steps)


@functools.lru_cache(maxsize=8)
def _ascent(mdp: MDP, gamma: float, horizon: int, lr: float) -> _Ascent:
    return _Ascent(mdp, gamma, horizon, lr)


class _Ascent:
    """Adam on the exact gradient from zero logits, with every iterate and its return kept: the
    fractions of one (MDP, gamma, H) share one path (training to 0.9 passes 0.25, 0.5, 0.75)."""

    def __init__(self, mdp: MDP, gamma: float, horizon: int, lr: float):
        self.problem = (mdp, uniform(mdp.n_states, mdp.n_actions), gamma, horizon)
        self.J_u = float(objective(*self.problem))
        self.span = optimal_return(mdp, gamma, horizon) - self.J_u
        self.theta = self.problem[1].params.clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.theta], lr=lr)
        self.thetas: list[torch.Tensor] = []  # theta_k, k = 0, 1, ...
        self.returns: list[float] = []  # J(theta_k)

    def _step(self) -> None:
        """Record J at the current iterate, then take one Adam step."""
        self.opt.zero_grad()
        value = objective(*self.problem, self.theta)
        self.thetas.append(self.theta.detach().clone())
        self.returns.append(float(value.detach()))
        (-value).backward()
        self.opt.step()

    def logits(self, fraction: float, max_steps: int) -> torch.Tensor:
        """The first iterate whose return reaches J_u + fraction (J* - J_u), bisected back from
        its predecessor to 1e-10 of (J* - J_u)."""
        target = self.J_u + fraction * self.span
        k = next((i for i, J in enumerate(self.returns) if J >= target), None)
        while k is None and len(self.returns) <= max_steps:
            self._step()
            if self.returns[-1] >= target:
                k = len(self.returns) - 1
        if k is None:
            reached = (max(self.returns) - self.J_u) / self.span
            raise InputError(
                f"trained policy: a stationary softmax policy reached only {reached:.3f} of the "
                f"way to the optimal return after {max_steps} steps; ask for a smaller fraction "
                f"than {fraction}")
        if k == 0:
            return self.thetas[0]
        mdp, start, gamma, horizon = self.problem
        return _bisect(mdp, start, gamma, horizon, self.thetas[k - 1], self.thetas[k], target,
                       1e-10 * abs(self.span))


def _bisect(mdp: MDP, policy: Policy, gamma: float, horizon: int, lo: torch.Tensor,
            hi: torch.Tensor, target: float, tol: float) -> torch.Tensor:
    """Point on the segment lo-hi whose return is within tol of target (J(lo) < target <= J(hi))."""
    a, b = 0.0, 1.0
    for _ in range(200):
        mid = (a + b) / 2
        J = float(objective(mdp, policy, gamma, horizon, lo + mid * (hi - lo)))
        if abs(J - target) <= tol:
            break
        a, b = (mid, b) if J < target else (a, mid)
    return lo + mid * (hi - lo)
