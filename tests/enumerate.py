"""Every trajectory of a tiny MDP with its probability, as a Batch (for exact expectations)."""

from __future__ import annotations

import torch

from suite.core.mdp import MDP
from suite.core.sampler import Batch


def all_trajectories(mdp: MDP, pi: torch.Tensor, horizon: int) -> tuple[Batch, torch.Tensor]:
    """(Batch of every possible trajectory, probabilities [N]) under policy table pi."""
    paths = []  # (prob, states, actions, rewards)

    def grow(prob, s, states, actions, rewards):
        if len(states) == horizon:
            paths.append((prob, states, actions, rewards))
            return
        for a in range(mdp.n_actions):
            for s2 in range(mdp.n_states):
                p = prob * float(pi[s, a]) * float(mdp.P[s, a, s2])
                if p == 0.0:
                    continue
                st, ac, rw = states + [s], actions + [a], rewards + [float(mdp.R[s, a, s2])]
                if bool(mdp.terminated[s, a, s2]):
                    paths.append((p, st, ac, rw))
                else:
                    grow(p, s2, st, ac, rw)

    for s0 in range(mdp.n_states):
        if mdp.rho0[s0] > 0:
            grow(float(mdp.rho0[s0]), s0, [], [], [])
    N, H = len(paths), horizon
    states = torch.zeros(N, H, dtype=torch.int64)
    actions = torch.zeros(N, H, dtype=torch.int64)
    rewards = torch.zeros(N, H, dtype=torch.float64)
    lengths = torch.tensor([len(p[1]) for p in paths])
    for i, (_, st, ac, rw) in enumerate(paths):
        states[i, : len(st)] = torch.tensor(st)
        actions[i, : len(ac)] = torch.tensor(ac)
        rewards[i, : len(rw)] = torch.tensor(rw, dtype=torch.float64)
    mask = torch.arange(H)[None, :] < lengths[:, None]
    probs = torch.tensor([p[0] for p in paths], dtype=torch.float64)
    return Batch(states, actions, rewards, mask, lengths, H), probs


def all_pairs(batch: Batch, probs: torch.Tensor) -> tuple[Batch, torch.Tensor]:
    """Every ordered pair (i, j) as a batch of 2 (trajectories 2k, 2k+1), with p_i p_j."""
    return all_groups(batch, probs, 2)


def all_groups(batch: Batch, probs: torch.Tensor, B: int, rho0: torch.Tensor | None = None
               ) -> tuple[Batch, torch.Tensor]:
    """Every ordered B-tuple of trajectories as a batch of B (trajectories Bk .. Bk+B-1), with
    the product of their probabilities.

    rho0 given (shared start): only the tuples whose members share a start state s, each with
    probability rho0(s) prod_i P(tau_i | s)."""
    N = batch.n
    members = torch.cartesian_prod(*[torch.arange(N)] * B).reshape(-1, B)  # [N^B, B]
    weight = torch.ones(len(members), dtype=probs.dtype)
    if rho0 is not None:
        start = batch.states[members, 0]  # [tuples, B]
        keep = (start == start[:, :1]).all(1)
        members = members[keep]
        weight = 1 / rho0[start[keep, 0]] ** (B - 1)
    order = members.reshape(-1)

    def pick(x):
        return x[order]

    paired = Batch(pick(batch.states), pick(batch.actions), pick(batch.rewards), pick(batch.mask),
                   pick(batch.lengths), batch.horizon)
    return paired, probs[members].prod(1) * weight
