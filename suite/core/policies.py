"""Differentiable policies over a finite state space, and their initialisers.

A policy maps its parameters theta [P] to logits [S, A]; pi(.|s) = softmax(logits[s]). The tabular
softmax policy has theta = logits (P = S*A); the MLP policy reads a one-hot state, so nothing
downstream may assume that theta is a table of logits.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import InputError, unknown_name
from .limits import check_limit
from .specs import parse_spec

__all__ = ["POLICY_KINDS", "Policy", "call_with_options", "mlp", "policy_from_spec", "random_policy",
           "tabular", "uniform"]


@dataclass(frozen=True)
class Policy:
    """A stochastic policy pi_theta(a|s) over S states and A actions."""

    kind: str  # "tabular" (theta = logits) or "mlp"
    params: Tensor  # [P] float64, theta
    n_states: int
    n_actions: int
    logits_fn: Callable[[Tensor], Tensor]  # theta [P] -> logits [S, A], differentiable
    name: str = "policy"

    @property
    def tabular(self) -> bool:
        return self.kind == "tabular"

    @property
    def n_params(self) -> int:
        return self.params.numel()

    def log_probs(self, params: Tensor | None = None) -> Tensor:
        """log pi(a|s) as a table [S, A]."""
        return torch.log_softmax(self.logits_fn(self.params if params is None else params), -1)

    def probs(self, params: Tensor | None = None) -> Tensor:
        """pi(a|s) as a table [S, A]."""
        return torch.softmax(self.logits_fn(self.params if params is None else params), -1)

    def with_params(self, params: Tensor, name: str | None = None) -> Policy:
        return dataclasses.replace(self, params=params.detach().clone(), name=name or self.name)


def _table(S: int, A: int) -> Callable[[Tensor], Tensor]:
    return lambda theta: theta.reshape(S, A)


def tabular(logits: Tensor, name: str = "tabular") -> Policy:
    """Tabular softmax: theta = logits [S, A], flattened."""
    S, A = logits.shape
    return Policy("tabular", logits.detach().to(torch.float64).reshape(-1).clone(), S, A,
                  _table(S, A), name)


def uniform(S: int, A: int) -> Policy:
    """pi(a|s) = 1/A: tabular softmax with zero logits."""
    return tabular(torch.zeros(S, A, dtype=torch.float64), name="uniform")


def random_policy(S: int, A: int, temperature: float = 1.0, seed: int = 0) -> Policy:
    """Tabular softmax with logits ~ N(0, 1) / temperature (higher temperature: closer to uniform)."""
    if not temperature > 0:
        raise InputError(f"random policy: temperature must be > 0, got {temperature}")
    gen = torch.Generator().manual_seed(int(seed))
    logits = torch.randn(S, A, generator=gen, dtype=torch.float64) / temperature
    return tabular(logits, name=f"random:temperature={temperature},seed={seed}")


def from_npy(path: str, S: int, A: int) -> Policy:
    """Tabular softmax with logits [S, A] read from an .npy file."""
    try:
        logits = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"policy file '{path}' does not exist") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc})") from None
    if logits.shape != (S, A):
        raise InputError(
            f"{path}: policy logits must have shape [S, A] = [{S}, {A}] for this environment, "
            f"got {list(logits.shape)}"
        )
    if (not (np.issubdtype(logits.dtype, np.floating) or np.issubdtype(logits.dtype, np.integer))
            or not np.isfinite(logits).all()):
        raise InputError(f"{path}: policy logits must be finite real numbers, got an array of "
                         f"dtype {logits.dtype}; save real logits, e.g. np.save(path, logits.real)")
    return tabular(torch.as_tensor(logits, dtype=torch.float64), name=os.path.basename(path))


def mlp(S: int, A: int, hidden: int = 16, seed: int = 0, scale: float = 1.0) -> Policy:
    """A one-hidden-layer tanh MLP on one-hot states: logits(s) = W2 tanh(W1[:, s] + b1) + b2.

    Weights ~ N(0, scale^2 / fan_in), biases 0. Not tabular: theta has (S+1)*hidden + (hidden+1)*A
    entries and couples the states through the shared output layer.
    """
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise InputError(f"mlp policy: hidden must be a whole number >= 1, got {hidden!r}")
    check_limit("parameters", (S + 1) * hidden + (hidden + 1) * A,
                f"mlp policy: the number of parameters ((S+1) x hidden + (hidden+1) x A, "
                f"hidden={hidden:,})")
    gen = torch.Generator().manual_seed(int(seed))
    w1 = torch.randn(hidden, S, generator=gen, dtype=torch.float64) * scale
    w2 = torch.randn(A, hidden, generator=gen, dtype=torch.float64) * scale / hidden**0.5
    theta = torch.cat([w1.reshape(-1), torch.zeros(hidden, dtype=torch.float64),
                       w2.reshape(-1), torch.zeros(A, dtype=torch.float64)])
    sizes = [hidden * S, hidden, A * hidden, A]

    def logits_fn(params: Tensor) -> Tensor:
        a, b1, c, b2 = torch.split(params, sizes)
        hidden_act = torch.tanh(a.reshape(hidden, S).T + b1)  # [S, hidden]: one-hot input
        return hidden_act @ c.reshape(A, hidden).T + b2

    return Policy("mlp", theta, S, A, logits_fn, name=f"mlp:hidden={hidden},seed={seed}")


POLICY_KINDS = ("uniform", "random", "mlp")  # built here; "trained" is a harness step


def policy_from_spec(spec: str, n_states: int, n_actions: int) -> Policy:
    """Build the policy named by ``spec`` for S states and A actions.

    ``uniform`` | ``random:temperature=1,seed=0`` | ``mlp:hidden=16,seed=0`` | a path to an
    ``.npy`` of logits [S, A]. (``trained:fraction=0.5`` runs the exact solver: see
    ``suite.harness.problem.make_policy``.)
    """
    S, A = n_states, n_actions
    if spec.endswith(".npy") or os.path.sep in spec:
        return from_npy(spec, S, A)
    name, kw = parse_spec(spec)
    builders = {"uniform": uniform, "random": random_policy, "mlp": mlp}
    if name not in builders:
        raise unknown_name("policy", name, POLICY_KINDS)
    return call_with_options(spec, builders[name], S, A, **kw)


def call_with_options(spec: str, builder: Callable[..., Policy], *args, **options) -> Policy:
    """builder(*args, **options); options the builder does not take are one InputError line."""
    try:
        inspect.signature(builder).bind(*args, **options)
    except TypeError:
        valid = list(inspect.signature(builder).parameters)[len(args):]
        raise InputError(
            f"policy '{spec}': unknown option(s) {sorted(options)}; valid options: "
            f"{', '.join(valid) or 'none'}"
        ) from None
    return builder(*args, **options)
