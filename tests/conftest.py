"""Shared fixtures: tiny MDPs small enough to enumerate every trajectory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from suite.core.mdp import MDP


def tiny_mdp(seed: int = 0, S: int = 3, A: int = 2, terminating: bool = True) -> MDP:
    """A random MDP with S states and A actions; some transitions terminate when asked."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(S), size=(S, A))
    P[0, 0] = 0.0
    P[0, 0, 1] = 1.0  # a deterministic row
    R = rng.normal(size=(S, A, S))
    term = np.zeros((S, A, S), dtype=bool)
    if terminating:
        term[:, :, S - 1] = rng.uniform(size=(S, A)) < 0.7
    rho0 = rng.dirichlet(np.ones(S))
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    return MDP(t(P), t(R), torch.as_tensor(term), t(rho0), name=f"tiny{seed}")


@pytest.fixture(params=[True, False], ids=["terminating", "continuing"])
def tiny(request) -> MDP:
    return tiny_mdp(seed=1, terminating=request.param)
