"""Vectorised trajectory sampler: N episodes of horizon H in parallel on a torch device.

Each step draws one uniform number per trajectory and picks the joint outcome (a, s') of the
current state, with probability pi(a|s) P(s'|s,a), by Walker's alias method; the reward is
R(s, a, s'), and a terminating transition moves into an absorbing sink, so every later step is
masked. Chunks of trajectories are
sampled one after another so memory stays bounded; chunk c draws from a generator seeded with
(seed, c), so a result is reproducible from (seed, chunk_size, device).

``group_size`` G (shared start): trajectories G k .. G k + G - 1 start from one start state drawn
once for the group, as G responses are sampled per prompt; each trajectory's own distribution is
unchanged, the members of a group are independent given their start.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .mdp import MDP

__all__ = ["Batch", "ChunkSampler", "default_chunk_size", "resolve_device", "sample", "sample_chunks"]

CHUNK_BYTES = 48 * 2**20  # one chunk's buffers: small enough to stay in the allocator's cache
CUDA_CHUNK_BYTES = 4 * 2**30  # on a GPU: each step is a few kernel launches over the whole chunk,
#                               so chunks must be large enough to hide the launches


@dataclass(frozen=True)
class Batch:
    """N sampled trajectories, padded to T = the longest realised length (T <= horizon)."""

    states: Tensor  # [N, T] int64, s_t (0 where mask is False)
    actions: Tensor  # [N, T] int64, a_t (0 where mask is False)
    rewards: Tensor  # [N, T] float64, r_t = R(s_t, a_t, s_{t+1}) (0 where mask is False)
    mask: Tensor  # [N, T] bool, step t happened, i.e. t < lengths[i]
    lengths: Tensor  # [N] int64, realised length T_i: H, or the step after which it terminated
    horizon: int  # H, the episode's time limit

    @property
    def n(self) -> int:
        return self.states.shape[0]

    def rows(self, start: int, stop: int) -> Batch:
        """Trajectories start .. stop - 1 (views, same T)."""
        return Batch(self.states[start:stop], self.actions[start:stop], self.rewards[start:stop],
                     self.mask[start:stop], self.lengths[start:stop], self.horizon)

    def returns(self, gamma: float) -> Tensor:
        """Discounted return sum_t gamma^t r_t of each trajectory, shape [N]."""
        T = self.rewards.shape[1]
        discount = gamma ** torch.arange(T, dtype=torch.float64, device=self.rewards.device)
        return self.rewards @ discount


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu' and 'cuda[:k]' as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device must be auto, cpu or cuda, got '{device}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA device is available; use auto "
                         "or cpu")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, got '{device}'")
    return dev


def default_chunk_size(horizon: int, device: str | torch.device | None = None) -> int:
    """Trajectories per chunk so that one chunk's buffers take about CHUNK_BYTES (on CUDA,
    CUDA_CHUNK_BYTES)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    return max(1024, (CUDA_CHUNK_BYTES if cuda else CHUNK_BYTES) // (26 * horizon))


def alias_tables(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Walker's alias tables for each row of probs [R, M] (rows sum to 1), vectorised over rows.

    Drawing column c uniformly and keeping it with probability keep[r, c], else taking
    alias[r, c], yields column j with probability probs[r, j] exactly (up to float64 rounding).
    Returns keep [R, M] float64 and alias [R, M] int64.
    """
    R, M = probs.shape
    q = probs.to(torch.float64) * M
    keep = torch.ones(R, M, dtype=torch.float64)
    alias = torch.arange(M).repeat(R, 1)
    done = torch.zeros(R, M, dtype=torch.bool)
    rows = torch.arange(R)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for _ in range(M - 1):  # each pass settles one column per row: the smallest remaining q
        small = torch.where(done, inf, q).argmin(1)
        large = torch.where(done, -inf, q).argmax(1)
        keep[rows, small] = q[rows, small].clamp(max=1.0)
        alias[rows, small] = large
        q[rows, large] -= 1.0 - q[rows, small]
        done[rows, small] = True
    return keep, alias


class _Tables:
    """Joint outcome (a, s') tables of one (MDP, policy) on the sampling device.

    Outcome o = s*M + a*K + k (M = A*K) of state s is action a and successor k. State S is the
    absorbing sink: a terminating outcome leads there, and the sink only leads back to itself.
    """

    def __init__(self, mdp: MDP, pi: Tensor, device: torch.device):
        succ = mdp.successors
        S, A, K = succ.prob.shape
        M = A * K
        joint = (pi.to(torch.float64).cpu()[:, :, None] * succ.prob).reshape(S, M)
        joint = torch.cat([joint / joint.sum(-1, keepdim=True),
                           torch.full((1, M), 1.0 / M, dtype=torch.float64)])  # + sink row
        keep, alias = alias_tables(joint)
        base = torch.arange(S + 1)[:, None] * M
        self.M, self.K, self.A, self.sink = M, K, A, S
        self.keep = keep.reshape(-1).to(device)  # [(S+1)*M]
        self.alias = (alias + base).reshape(-1).to(device)  # [(S+1)*M] global outcome
        nxt = torch.where(succ.terminated, S, succ.next_state).reshape(-1)
        self.next_state = torch.cat([nxt, torch.full((M,), S)]).to(device)
        self.reward = torch.cat([succ.reward.reshape(-1),
                                 torch.zeros(M, dtype=torch.float64)]).to(device)
        rho_keep, rho_alias = alias_tables(mdp.rho0[None, :] / mdp.rho0.sum())
        self.rho_keep, self.rho_alias = rho_keep[0].to(device), rho_alias[0].to(device)

    @staticmethod
    def draw(u: Tensor, width: int, base: Tensor | int, keep: Tensor, alias: Tensor) -> Tensor:
        """Alias draw from one uniform u in [0, 1): column floor(u*width), kept w.p. keep."""
        x = u * width
        col = x.long()
        idx = base + col
        return torch.where(x - col < keep[idx], idx, alias[idx])


def _check(mdp: MDP, pi: Tensor, horizon: int, n: int) -> None:
    if tuple(pi.shape) != (mdp.n_states, mdp.n_actions):
        raise InputError(f"policy table must have shape [{mdp.n_states}, {mdp.n_actions}], "
                         f"got {list(pi.shape)}")
    if int(horizon) != horizon or horizon < 1:
        raise InputError(f"horizon must be an integer >= 1, got {horizon}")
    if n < 1:
        raise InputError(f"number of trajectories must be >= 1, got {n}")


def _sample_chunk(tab: _Tables, horizon: int, n: int, gen: torch.Generator,
                  device: torch.device, group_size: int = 1) -> Batch:
    """On the CPU one compiled walk per trajectory; elsewhere the vectorised torch loop. Both
    read the same uniforms (the start states', then one per trajectory and step) and return the
    same Batch to the last bit (tests/test_sampler.py)."""
    if device.type == "cpu":
        return _sample_chunk_compiled(tab, horizon, n, gen, group_size)
    return _sample_chunk_torch(tab, horizon, n, gen, device, group_size)


def _padded_length(longest: int, horizon: int) -> int:
    """T: the torch loop stops at the first multiple of 8 at which every trajectory has ended."""
    return min(horizon, max(8, -(-longest // 8) * 8))


def _sample_chunk_compiled(tab: _Tables, horizon: int, n: int, gen: torch.Generator,
                           group_size: int = 1) -> Batch:
    u0 = torch.rand(n // group_size, generator=gen, dtype=torch.float64, device=gen.device)
    u = torch.rand(horizon * n, generator=gen, dtype=torch.float64, device=gen.device)
    states = torch.zeros(n, horizon, dtype=torch.int64)
    actions = torch.zeros(n, horizon, dtype=torch.int64)
    rewards = torch.zeros(n, horizon, dtype=torch.float64)
    lengths = torch.zeros(n, dtype=torch.int64)
    _walk(u0.numpy(), u.numpy().reshape(horizon, n), group_size, tab.M, tab.K, tab.A,
          tab.sink, tab.keep.numpy(), tab.alias.numpy(), tab.next_state.numpy(),
          tab.reward.numpy(), tab.rho_keep.numpy(), tab.rho_alias.numpy(), states.numpy(),
          actions.numpy(), rewards.numpy(), lengths.numpy())
    T = _padded_length(int(lengths.max()), horizon)
    states, actions, rewards = (x[:, :T].contiguous() for x in (states, actions, rewards))
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return Batch(states, actions, rewards, mask, lengths, int(horizon))


@numba.njit(nogil=True, cache=True)
def _walk(u0, u, group_size, M, K, A, sink, keep, alias, next_state, reward, rho_keep, rho_alias,
          states, actions, rewards, lengths):  # pragma: no cover - compiled
    """Each trajectory until it enters the sink (or the horizon): the alias draw of _Tables.draw
    with uniform u[t, i] at step t, the start state's with u0[i // group_size]."""
    H, n = u.shape
    for i in range(n):
        x = u0[i // group_size] * sink
        col = np.int64(x)
        s = col if x - col < rho_keep[col] else rho_alias[col]
        t = 0
        while t < H and s != sink:
            x = u[t, i] * M
            col = np.int64(x)
            idx = s * M + col
            o = idx if x - col < keep[idx] else alias[idx]
            states[i, t] = s
            actions[i, t] = (o // K) % A
            rewards[i, t] = reward[o]
            s = next_state[o]
            t += 1
        lengths[i] = t


def _sample_chunk_torch(tab: _Tables, horizon: int, n: int, gen: torch.Generator,
                        device: torch.device, group_size: int = 1) -> Batch:
    def uniform(k: int = n) -> Tensor:  # from gen's stream, wherever it lives
        return torch.rand(k, generator=gen, dtype=torch.float64, device=gen.device).to(device)

    states = torch.empty(horizon, n, dtype=torch.int64, device=device)
    outcomes = torch.empty(horizon, n, dtype=torch.int64, device=device)
    s = _Tables.draw(uniform(n // group_size), tab.sink, 0, tab.rho_keep, tab.rho_alias)
    s = s.repeat_interleave(group_size) if group_size > 1 else s
    T = horizon
    for t in range(horizon):
        if t % 8 == 0 and t > 0 and bool((s == tab.sink).all()):
            T = t
            break
        states[t] = s
        outcomes[t] = o = _Tables.draw(uniform(), tab.M, s * tab.M, tab.keep, tab.alias)
        s = tab.next_state[o]
    states, outcomes = states[:T].T.contiguous(), outcomes[:T].T.contiguous()  # [N, T] rows
    mask = states != tab.sink
    actions = (outcomes // tab.K) % tab.A
    return Batch(
        states=torch.where(mask, states, 0),
        actions=torch.where(mask, actions, 0),
        rewards=tab.reward[outcomes],
        mask=mask,
        lengths=mask.sum(1),
        horizon=int(horizon),
    )


class ChunkSampler:
    """n trajectories under policy table pi as numbered chunks; chunk c is drawn from its own
    generator, seeded by (seed, c), so any chunk can be drawn alone, by any thread, in any order,
    and the trajectories depend only on (seed, chunk_size, group_size) and the random stream.
    ``group_size`` G > 1: each run of G trajectories shares one start state (G must divide n
    and chunk_size). ``stream``: "device" draws the uniforms on the sampling device (CUDA's
    Philox stream differs from the CPU's Mersenne twister, so a GPU run and a CPU run of one
    seed see different trajectories); "cpu" draws them on the CPU and moves them (the CPU's
    trajectories on any device; slower, for checks)."""

    def __init__(self, mdp: MDP, pi: Tensor, horizon: int, n: int, seed: int = 0,
                 device: str | torch.device = "auto", chunk_size: int | None = None,
                 group_size: int = 1, stream: str = "device"):
        _check(mdp, pi, horizon, n)
        if stream not in ("device", "cpu"):
            raise InputError(f"random stream must be device or cpu, got '{stream}'")
        self.device = resolve_device(device)
        self.stream = stream
        self.tables = _Tables(mdp, pi.detach(), self.device)
        self.horizon, self.n, self.seed = int(horizon), int(n), int(seed)
        self.group_size = int(group_size)
        g = max(self.group_size, 1)
        self.chunk_size = chunk_size or max(g, default_chunk_size(horizon, self.device) // g * g)
        if self.group_size < 1 or n % self.group_size or self.chunk_size % self.group_size:
            raise InputError(f"shared start: the group size must divide the number of "
                             f"trajectories ({n}) and the chunk size ({self.chunk_size}), got "
                             f"{group_size}")

    def __len__(self) -> int:
        return -(-self.n // self.chunk_size)

    def first(self, c: int) -> int:
        """Index of chunk c's first trajectory."""
        return c * self.chunk_size

    def chunk(self, c: int) -> Batch:
        if not 0 <= c < len(self):
            raise IndexError(f"chunk {c} out of range 0..{len(self) - 1}")
        gen = torch.Generator(device="cpu" if self.stream == "cpu" else self.device)
        gen.manual_seed(int(np.random.SeedSequence([self.seed, c]).generate_state(1)[0]))
        size = min(self.chunk_size, self.n - self.first(c))
        return _sample_chunk(self.tables, self.horizon, size, gen, self.device, self.group_size)


def sample_chunks(mdp: MDP, pi: Tensor, horizon: int, n: int, seed: int = 0,
                  device: str | torch.device = "auto", chunk_size: int | None = None,
                  group_size: int = 1) -> Iterator[Batch]:
    """Yield Batches of at most ``chunk_size`` trajectories, n in total, under policy table pi."""
    sampler = ChunkSampler(mdp, pi, horizon, n, seed, device, chunk_size, group_size)
    return (sampler.chunk(c) for c in range(len(sampler)))


def sample(mdp: MDP, pi: Tensor, horizon: int, n: int, seed: int = 0,
           device: str | torch.device = "auto", chunk_size: int | None = None,
           group_size: int = 1) -> Batch:
    """All n trajectories in one Batch (for moderate n; use sample_chunks for large n)."""
    chunks = list(sample_chunks(mdp, pi, horizon, n, seed, device, chunk_size, group_size))
    T = max(b.mask.shape[1] for b in chunks)

    def cat(field: str) -> Tensor:
        return torch.cat([torch.nn.functional.pad(getattr(b, field), (0, T - b.mask.shape[1]))
                          for b in chunks])

    return Batch(cat("states"), cat("actions"), cat("rewards"), cat("mask"),
                 torch.cat([b.lengths for b in chunks]), int(horizon))
