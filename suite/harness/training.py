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


@functools.lru_cache(maxsize=64)
def _trained_logits(mdp: MDP, gamma: float, horizon: int, fraction: float, lr: float,
                    max_steps: int) -> torch.Tensor:
    start = uniform(mdp.n_states, mdp.n_actions)
    J_u = float(objective(mdp, start, gamma, horizon))
    J_star = optimal_return(mdp, gamma, horizon)
    span = J_star - J_u
    target = J_u + fraction * span
    theta = start.params.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    J = J_u
    for _ in range(max_steps):
        if J >= target:
            return theta.detach()
        previous = theta.detach().clone()
        opt.zero_grad()
        value = objective(mdp, start, gamma, horizon, theta)
        (-value).backward()
        opt.step()
        J = float(objective(mdp, start, gamma, horizon, theta.detach()))
        if J >= target:
            return _bisect(mdp, start, gamma, horizon, previous, theta.detach(), target,
                           1e-10 * abs(span))
    raise InputError(
        f"trained policy: a stationary softmax policy reached only "
        f"{(J - J_u) / span:.3f} of the way to the optimal return after {max_steps} steps; "
        f"ask for a smaller fraction than {fraction}"
    )


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
