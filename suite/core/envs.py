"""Builders of finite MDPs: gymnasium toy_text tables, Garnet, a delayed-reward chain, .npz files.

``make_mdp(spec)`` takes one string:

* a gymnasium id with optional keyword arguments: ``FrozenLake-v1:map_name=8x8,is_slippery=false``
* a generator spec: ``garnet:S=20,A=4,branching=3,seed=0``, ``chain:n=10,slip=0.1`` or the
  token-level LLM task ``tokens:vocab=3,max_len=6,prompts=4,seed=0`` (``suite.core.tokens``)
* a path to an ``.npz`` file with P [S,A,S'], R [S,A,S'] or [S,A], rho0 [S], optional terminated
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .errors import InputError, did_you_mean, unknown_name
from .limits import check_limit
from .mdp import MDP
from .specs import parse_spec
from .tokens import tokens

__all__ = ["TOY_TEXT_IDS", "available_envs", "chain", "check_size", "from_gymnasium", "garnet",
           "load_npz", "make_mdp"]

TOY_TEXT_IDS = (
    "FrozenLake-v1",
    "FrozenLake8x8-v1",
    "CliffWalking-v1",
    "CliffWalkingSlippery-v1",
    "Taxi-v4",
)
# Options that change a toy_text environment's step() without changing its transition table.
_UNMODELLED = {"fickle_passenger": "Taxi's fickle passenger is not in its transition table P"}


def check_size(name: str, S: int, A: int) -> None:
    """Refuse an environment whose tables would exceed the bounds (before allocating them)."""
    check_limit("state_actions", S * A, f"{name}: states x actions ({S:,} x {A:,})")
    check_limit("transitions", S * A * S, f"{name}: the transition table (states x actions x "
                f"states, {S:,} x {A:,} x {S:,})")


def _whole(name: str, **values) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name}: option {key} must be a whole number, got {value!r}")


def _tensor(array: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=dtype)


def from_gymnasium(env_id: str, **kwargs) -> MDP:
    """Read the transition table ``env.unwrapped.P`` of a gymnasium toy_text environment.

    ``P[s][a] = [(prob, s', r, terminated), ...]``; duplicate (s, a, s') entries add up (their
    rewards are averaged with the probabilities as weights). rho0 is ``initial_state_distrib``.
    """
    import gymnasium as gym

    for key, why in _UNMODELLED.items():
        if kwargs.get(key):
            raise InputError(f"{env_id}: option {key}=True is not supported: {why}")
    if env_id not in gym.registry:
        known = [k for k in gym.registry if k in TOY_TEXT_IDS]
        raise unknown_name("environment", env_id, known + list(GENERATORS))
    valid = _constructor_options(gym.registry[env_id].entry_point)
    for key in kwargs:
        if valid is not None and key not in valid:
            raise InputError(f"{env_id}: unknown option '{key}'{did_you_mean(key, valid)} valid "
                             f"options: {', '.join(valid) or 'none'}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            env = gym.make(env_id, **kwargs)
        except Exception as exc:  # gymnasium raises many types for missing extras
            raise InputError(f"{env_id}: cannot be built ({type(exc).__name__}: {exc})") from None
    raw = env.unwrapped
    table = getattr(raw, "P", None)
    if not isinstance(table, dict) or not hasattr(raw, "initial_state_distrib"):
        env.close()
        raise InputError(
            f"{env_id} has no transition table (env.unwrapped.P): exact gradients need a tabular "
            f"model; use one of {', '.join(TOY_TEXT_IDS)}, a generator (garnet, chain) or an .npz"
        )
    S, A = int(raw.observation_space.n), int(raw.action_space.n)  # type: ignore[attr-defined]
    check_size(env_id, S, A)
    P = np.zeros((S, A, S))
    R = np.zeros((S, A, S))
    term = np.zeros((S, A, S), dtype=bool)
    for s in range(S):
        for a in range(A):
            for prob, s_next, reward, done in table[s][a]:
                old = P[s, a, s_next]
                if old > 0 and R[s, a, s_next] != reward:  # probability-weighted mean reward
                    R[s, a, s_next] = (old * R[s, a, s_next] + prob * reward) / (old + prob)
                elif old == 0:
                    R[s, a, s_next] = reward
                P[s, a, s_next] += prob
                term[s, a, s_next] |= bool(done)
    rho0 = np.asarray(raw.initial_state_distrib, dtype=np.float64)
    env.close()
    options = ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    name = env_id + (f":{options}" if options else "")
    return MDP(_tensor(P), _tensor(R), _tensor(term, torch.bool), _tensor(rho0), name=name)


def _constructor_options(entry_point) -> list[str] | None:
    """Keyword arguments of a gymnasium environment's constructor (None if it takes **kwargs)."""
    if isinstance(entry_point, str):
        module, _, attr = entry_point.partition(":")
        try:
            entry_point = getattr(__import__(module, fromlist=[attr]), attr)
        except Exception:  # a missing optional dependency: let gym.make report it
            return None
    params = inspect.signature(entry_point).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n in params if n not in ("self", "render_mode")]


def garnet(S: int = 20, A: int = 4, branching: int = 3, seed: int = 0) -> MDP:
    """Garnet(S, A, b) random MDP (Archibald et al. 1995; Bhatnagar et al. 2009).

    Each (s, a) moves to ``branching`` distinct states chosen uniformly, with probabilities given by
    the gaps between sorted uniform cut points; reward r(s, a) ~ U[0, 1] (the same for every s');
    rho0 uniform; no termination. Deterministic given the seed.
    """
    _whole("garnet", S=S, A=A, branching=branching, seed=seed)
    if S < 1 or A < 1 or not 1 <= branching <= S:
        raise InputError(
            f"garnet: need S >= 1, A >= 1 and 1 <= branching <= S, got S={S}, A={A}, "
            f"branching={branching}"
        )
    if seed < 0:
        raise InputError(f"garnet: seed must be >= 0, got {seed}")
    check_size("garnet", S, 1)  # S x S before S x A: the message names the larger bound hit
    check_size("garnet", S, A)
    rng = np.random.default_rng(seed)
    P = np.zeros((S, A, S))
    for s in range(S):
        for a in range(A):
            succ = rng.choice(S, size=branching, replace=False)
            cuts = np.sort(rng.uniform(size=branching - 1))
            P[s, a, succ] = np.diff(np.concatenate([[0.0], cuts, [1.0]]))
    r = rng.uniform(size=(S, A))
    R = np.broadcast_to(r[:, :, None], (S, A, S)).copy()
    rho0 = np.full(S, 1.0 / S)
    name = f"garnet:S={S},A={A},branching={branching},seed={seed}"
    return MDP(_tensor(P), _tensor(R), torch.zeros(S, A, S, dtype=torch.bool), _tensor(rho0),
               name=name)


def chain(n: int = 10, slip: float = 0.0, reward: float = 1.0) -> MDP:
    """A chain with a delayed reward: the variance of REINFORCE grows with the horizon.

    States 0..n-1, start at 0. Action 1 ("right") moves to s+1 with probability 1 - slip and to
    max(s-1, 0) otherwise; action 0 ("left") moves to max(s-1, 0). Reaching state n-1 pays
    ``reward`` and ends the episode; every other transition pays 0.
    """
    _whole("chain", n=n)
    if n < 2 or not 0.0 <= slip < 1.0:
        raise InputError(f"chain: need n >= 2 and 0 <= slip < 1, got n={n}, slip={slip}")
    check_size("chain", n, 2)
    P = np.zeros((n, 2, n))
    for s in range(n):
        left = max(s - 1, 0)
        P[s, 0, left] += 1.0
        P[s, 1, min(s + 1, n - 1)] += 1.0 - slip
        P[s, 1, left] += slip
    R = np.zeros((n, 2, n))
    R[:, :, n - 1] = reward
    term = np.zeros((n, 2, n), dtype=bool)
    term[:, :, n - 1] = True
    rho0 = np.zeros(n)
    rho0[0] = 1.0
    return MDP(_tensor(P), _tensor(R), _tensor(term, torch.bool), _tensor(rho0),
               name=f"chain:n={n},slip={slip},reward={reward}")


def load_npz(path: str) -> MDP:
    """Load a user's MDP: P [S,A,S'], R [S,A,S'] or [S,A], rho0 [S], optional terminated [S,A,S']."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"environment file '{path}' does not exist") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [k for k in ("P", "R", "rho0") if k not in arrays]
    if missing:
        raise InputError(
            f"{path}: missing array(s) {missing}; an MDP file holds P [S,A,S'], R [S,A,S'] or "
            f"[S,A], rho0 [S] and optionally terminated [S,A,S'] (found {sorted(arrays)})"
        )
    unknown = sorted(set(arrays) - {"P", "R", "rho0", "terminated"})
    if unknown:
        raise InputError(f"{path}: unknown array(s) {unknown}; allowed: P, R, rho0, terminated")
    try:
        P = np.asarray(arrays["P"], dtype=np.float64)
        R = np.asarray(arrays["R"], dtype=np.float64)
        rho0 = np.asarray(arrays["rho0"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: P, R and rho0 must be numeric arrays ({exc})") from None
    if P.ndim != 3:
        raise InputError(f"{path}: P must have shape [S, A, S], got {list(P.shape)}")
    check_size(path, P.shape[0], P.shape[1])
    if R.ndim == 2 and R.shape == P.shape[:2]:
        R = np.broadcast_to(R[:, :, None], P.shape).copy()
    term = arrays.get("terminated", np.zeros(P.shape, dtype=bool))
    if term.dtype != np.bool_:
        raise InputError(f"{path}: terminated must be a bool array, got dtype {term.dtype}")
    return MDP(_tensor(P), _tensor(R), _tensor(term, torch.bool), _tensor(rho0),
               name=os.path.basename(path))


GENERATORS: dict[str, Callable[..., MDP]] = {"garnet": garnet, "chain": chain, "tokens": tokens}


def make_mdp(spec: str) -> MDP:
    """Build the MDP named by ``spec`` (gymnasium id, generator spec or .npz path)."""
    if spec.endswith(".npz") or os.path.sep in spec:
        return load_npz(spec)
    name, kwargs = parse_spec(spec)
    if name in GENERATORS:
        builder = GENERATORS[name]
        valid = list(inspect.signature(builder).parameters)
        bad = [k for k in kwargs if k not in valid]
        if bad:
            raise InputError(f"{name}: unknown option '{bad[0]}'{did_you_mean(bad[0], valid)} "
                             f"valid options: {', '.join(valid)}")
        for key, value in kwargs.items():
            if isinstance(value, str | bool):
                raise InputError(f"{name}: option {key} must be a number, got '{value}'")
        return builder(**kwargs)
    return from_gymnasium(name, **kwargs)


def available_envs() -> list[tuple[str, str]]:
    """(spec, description) of every built-in environment family."""
    rows = [(env_id, "gymnasium toy_text (options: its keyword arguments)") for env_id in TOY_TEXT_IDS]
    for name, builder in GENERATORS.items():
        opts = ",".join(f"{k}={p.default}" for k, p in inspect.signature(builder).parameters.items())
        summary = (builder.__doc__ or "").strip().splitlines()[0]
        rows.append((f"{name}:{opts}", summary))
    rows.append(("PATH.npz", "your MDP: P [S,A,S'], R [S,A,S'] or [S,A], rho0 [S], terminated"))
    return rows
