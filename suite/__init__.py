"""Variance-study suite for policy-gradient estimators: exact gradients, sampler, statistics.

The public API: the numerical core (``suite.core``) and the problem builder of the harness
(``make_policy`` also builds ``trained:`` policies, which runs the exact solver).
"""

from .core.envs import available_envs, make_mdp
from .core.errors import InputError
from .core.exact import ExactSolution, optimal_return, pgt_gradient, solve
from .core.mdp import MDP
from .core.policies import Policy
from .core.sampler import Batch, resolve_device, sample, sample_chunks
from .harness.problem import Problem, make_policy, make_problem

__all__ = [
    "MDP", "Batch", "ExactSolution", "InputError", "Policy", "Problem", "available_envs",
    "make_mdp", "make_policy", "make_problem", "optimal_return", "pgt_gradient", "resolve_device",
    "sample", "sample_chunks", "solve",
]
