from collections import Counter

import gymnasium as gym
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from suite.core.envs import TOY_TEXT_IDS, make_mdp
from suite.core.exact import solve
from suite.core.mdp import MDP
from suite.core.policies import random_policy
from suite.core.sampler import (
    _sample_chunk_compiled,
    _sample_chunk_torch,
    _Tables,
    alias_tables,
    sample,
    sample_chunks,
)

from .conftest import tiny_mdp

N_DRAWS = 3000  # per (s, a) pair and per source
ALPHA = 1e-3  # per chi-square test; fixed seeds make each run deterministic


def _busiest_pairs(mdp: MDP, k: int) -> list[tuple[int, int]]:
    """The k (s, a) pairs with the most distinct outcomes (s', reward, terminated)."""
    counts = (mdp.P > 0).sum(-1)
    order = torch.argsort(counts.reshape(-1), descending=True, stable=True)[:k]
    return [divmod(int(i), mdp.n_actions) for i in order]


def _suite_outcomes(mdp: MDP, s: int, a: int, seed: int) -> Counter:
    """Outcomes of N_DRAWS one-step rollouts of the suite's sampler from (s, a)."""
    start = torch.zeros(mdp.n_states, dtype=torch.float64)
    start[s] = 1.0
    pinned = MDP(mdp.P, mdp.R, mdp.terminated, start, name="pinned")
    pi = torch.zeros(mdp.n_states, mdp.n_actions, dtype=torch.float64)
    pi[:, a] = 1.0
    batch = sample(pinned, pi, 2, N_DRAWS, seed=seed, device="cpu")
    nxt = torch.where(batch.mask[:, 1], batch.states[:, 1], -1).tolist()
    return Counter(zip(nxt, batch.rewards[:, 0].tolist(), strict=True))


def _gym_outcomes(env_id: str, s: int, a: int, seed: int) -> Counter:
    env = gym.make(env_id).unwrapped
    env.reset(seed=seed)
    out = Counter()
    for _ in range(N_DRAWS):
        env.s = s
        nxt, reward, terminated, _, _ = env.step(a)
        out[(-1 if terminated else int(nxt), float(reward))] += 1
    return out


def _chi2_pvalue(a: Counter, b: Counter) -> float:
    keys = sorted(set(a) | set(b))
    if len(keys) == 1:
        return 1.0
    table = np.array([[a[k] for k in keys], [b[k] for k in keys]])
    return chi2_contingency(table).pvalue


@pytest.mark.parametrize("env_id", TOY_TEXT_IDS)
def test_transition_and_reward_frequencies_match_gymnasium(env_id):
    mdp = make_mdp(env_id)
    for i, (s, a) in enumerate(_busiest_pairs(mdp, 4)):
        p = _chi2_pvalue(_suite_outcomes(mdp, s, a, seed=i), _gym_outcomes(env_id, s, a, seed=i))
        assert p > ALPHA, f"{env_id} (s={s}, a={a}): p = {p:.2e}"


def test_frequency_check_detects_a_wrong_model():
    """The same check must fail when the sampler runs the non-slippery lake instead."""
    wrong = make_mdp("FrozenLake-v1:is_slippery=false")
    p = _chi2_pvalue(_suite_outcomes(wrong, 6, 1, seed=0),
                     _gym_outcomes("FrozenLake-v1", 6, 1, seed=0))
    assert p < 1e-12


def test_alias_tables_reproduce_the_probabilities_exactly():
    probs = torch.rand(50, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probs[:, 3] = 0.0
    probs[0] = 0.0
    probs[0, 6] = 1.0
    probs /= probs.sum(1, keepdim=True)
    keep, alias = alias_tables(probs)
    M = probs.shape[1]
    implied = (keep / M).clone()
    implied.scatter_add_(1, alias, (1 - keep) / M)
    assert torch.allclose(implied, probs, atol=1e-15)


def test_batch_layout_and_masks():
    mdp = tiny_mdp(seed=0)
    pi = random_policy(3, 2, seed=0).probs().detach()
    batch = sample(mdp, pi, 6, 500, seed=0, device="cpu")
    N, T = batch.states.shape
    assert N == 500 and T <= 6 and batch.horizon == 6
    assert torch.equal(batch.lengths, batch.mask.sum(1))
    # the mask is a prefix: once an episode ends it stays ended
    assert torch.equal(batch.mask, torch.arange(T)[None, :] < batch.lengths[:, None])
    assert (batch.rewards[~batch.mask] == 0).all()
    assert batch.states.dtype == torch.int64 and batch.rewards.dtype == torch.float64
    # transitions seen are possible under P
    s, a = batch.states[:, :-1][batch.mask[:, 1:]], batch.actions[:, :-1][batch.mask[:, 1:]]
    s2 = batch.states[:, 1:][batch.mask[:, 1:]]
    assert (mdp.P[s, a, s2] > 0).all() and not mdp.terminated[s, a, s2].any()


def test_reproducible_from_the_seed_and_chunking_is_transparent():
    mdp = make_mdp("FrozenLake-v1")
    pi = random_policy(16, 4, seed=1).probs().detach()
    a = sample(mdp, pi, 30, 1000, seed=7, device="cpu", chunk_size=300)
    b = sample(mdp, pi, 30, 1000, seed=7, device="cpu", chunk_size=300)
    c = sample(mdp, pi, 30, 1000, seed=8, device="cpu", chunk_size=300)
    assert torch.equal(a.states, b.states) and torch.equal(a.rewards, b.rewards)
    assert not torch.equal(a.states, c.states)
    chunks = list(sample_chunks(mdp, pi, 30, 1000, seed=7, device="cpu", chunk_size=300))
    assert [ch.n for ch in chunks] == [300, 300, 300, 100]
    assert torch.equal(torch.cat([ch.lengths for ch in chunks]), a.lengths)


def test_episode_lengths_match_exact_survival():
    """P(length > t) = sum_s d_t(s): the sampler's termination matches the solver's."""
    mdp = make_mdp("FrozenLake-v1")
    policy = random_policy(16, 4, seed=2)
    sol = solve(mdp, policy, 1.0, 20)
    batch = sample(mdp, sol.pi, 20, 100_000, seed=3, device="cpu")
    alive = batch.mask.double().mean(0)
    exact = sol.d.sum(-1)[: alive.numel()]
    se = (exact * (1 - exact)).clamp(min=0) / batch.n
    se = se.sqrt() + 1e-12
    assert ((alive - exact).abs() / se).max() < 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampler_matches_exact_return():
    mdp = make_mdp("Taxi-v4")
    policy = random_policy(500, 6, seed=0)
    sol = solve(mdp, policy, 0.99, 100)
    batch = sample(mdp, sol.pi, 100, 200_000, seed=0, device="cuda")
    assert batch.states.device.type == "cuda"
    G = batch.returns(0.99).cpu()
    assert abs(G.mean().item() - sol.J) < 5 * G.std().item() / len(G) ** 0.5


@pytest.mark.parametrize("env,horizon,group", [("FrozenLake-v1", 37, 1), ("CliffWalking-v1", 5, 1),
                                               ("Taxi-v4", 100, 4), ("tiny", 12, 3)])
def test_compiled_walk_draws_what_the_torch_loop_draws(env, horizon, group):
    """The CPU's compiled walk and the vectorised loop (CUDA's path) read the same uniforms
    and give the same Batch to the last bit, padding included."""
    mdp = tiny_mdp(seed=2, S=4, A=3) if env == "tiny" else make_mdp(env)
    pi = random_policy(mdp.n_states, mdp.n_actions, seed=1).probs().detach()
    tab = _Tables(mdp, pi, torch.device("cpu"))
    for seed in range(3):
        a = _sample_chunk_compiled(tab, horizon, 600, torch.Generator().manual_seed(seed), group)
        b = _sample_chunk_torch(tab, horizon, 600, torch.Generator().manual_seed(seed),
                                torch.device("cpu"), group)
        for field in ("states", "actions", "rewards", "mask", "lengths"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (env, seed, field)
