"""From a condition (environment, policy, gamma, horizon) to the problem every stage shares: the
MDP, the policy and its exact solution. Building a ``trained:`` policy runs the exact solver, so
it happens here, above the core.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..core.envs import make_mdp
from ..core.exact import ExactSolution, check_gamma_horizon, solve
from ..core.mdp import MDP
from ..core.policies import POLICY_KINDS as CORE_POLICY_KINDS
from ..core.policies import Policy, call_with_options, policy_from_spec
from ..core.specs import parse_spec
from .training import trained_policy

__all__ = ["POLICY_KINDS", "Problem", "make_policy", "make_problem"]

POLICY_KINDS = (*CORE_POLICY_KINDS, "trained")


@dataclass(frozen=True)
class Problem:
    """One (MDP, policy, gamma, H) and everything exact about it (float64)."""

    mdp: MDP
    policy: Policy
    solution: ExactSolution  # J, grad [P], Q [H,S,A], V [H+1,S], d [H,S], pi [S,A]

    @property
    def gamma(self) -> float:
        return self.solution.gamma

    @property
    def horizon(self) -> int:
        return self.solution.horizon


def make_policy(spec: str, mdp: MDP, gamma: float, horizon: int) -> Policy:
    """The policy named by ``spec`` for ``mdp``: every spec of ``policy_from_spec``, and
    ``trained:fraction=0.5`` (exact gradient ascent to that fraction of the optimal return, for
    this gamma and horizon)."""
    name, kw = parse_spec(spec)
    if name == "trained" and not spec.endswith(".npy"):
        return call_with_options(spec, trained_policy, mdp, gamma, horizon, **kw)
    return policy_from_spec(spec, mdp.n_states, mdp.n_actions)


@functools.lru_cache(maxsize=32)
def cached_mdp(env: str) -> MDP:
    """make_mdp, memoised: a study builds the same environment for many conditions."""
    return make_mdp(env)


def make_problem(env: str, policy: str, gamma: float, horizon: int, cache: bool = False) -> Problem:
    """Build the MDP, the policy and the exact solution; InputError names what is wrong."""
    check_gamma_horizon(gamma, horizon)
    mdp = cached_mdp(env) if cache else make_mdp(env)
    pol = make_policy(policy, mdp, gamma, horizon)
    return Problem(mdp, pol, solve(mdp, pol, gamma, horizon))
