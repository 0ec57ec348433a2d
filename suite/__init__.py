"""Variance-study suite for policy-gradient estimators: exact gradients, sampler, statistics."""

from .envs import available_envs, make_mdp
from .errors import InputError
from .exact import ExactSolution, optimal_return, pgt_gradient, solve
from .mdp import MDP
from .policies import Policy, make_policy
from .sampler import Batch, resolve_device, sample, sample_chunks

__all__ = [
    "MDP", "Batch", "ExactSolution", "InputError", "Policy", "available_envs", "make_mdp",
    "make_policy", "optimal_return", "pgt_gradient", "resolve_device", "sample", "sample_chunks",
    "solve",
]
