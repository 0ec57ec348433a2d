import itertools

import numpy as np
import pytest
import torch

from suite.core.envs import TOY_TEXT_IDS, garnet, load_npz, make_mdp
from suite.core.exact import objective, optimal_return, pgt_gradient, solve
from suite.core.policies import mlp, random_policy, tabular, uniform
from suite.core.sampler import sample

from .conftest import tiny_mdp
from .reference import gym_tables, reference_gradient


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("env_id", TOY_TEXT_IDS)
def test_gradient_matches_independent_reference_on_toy_text(env_id):
    mdp = make_mdp(env_id)
    policy = random_policy(mdp.n_states, mdp.n_actions, temperature=2.0, seed=3)
    gamma, H = 0.97, 60
    sol = solve(mdp, policy, gamma, H)
    _, r, P_cont, rho0 = gym_tables(env_id)
    J_ref, g_ref = reference_gradient(r, P_cont, rho0, policy.params.reshape(mdp.n_states, -1)
                                      .numpy(), gamma, H)
    assert sol.J == pytest.approx(J_ref, rel=1e-8)
    assert _rel(sol.grad.reshape(mdp.n_states, -1), g_ref) < 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_matches_reference_on_garnet_npz(tmp_path, seed):
    g = garnet(S=15, A=3, branching=4, seed=seed)
    path = tmp_path / "garnet.npz"
    np.savez(path, P=g.P.numpy(), R=g.R.numpy(), rho0=g.rho0.numpy())
    mdp = load_npz(str(path))
    logits = np.random.default_rng(seed).normal(size=(15, 3))
    sol = solve(mdp, tabular(torch.as_tensor(logits)), 0.9, 40)
    r = (g.P * g.R).sum(-1).numpy()
    J_ref, g_ref = reference_gradient(r, g.P.numpy(), g.rho0.numpy(), logits, 0.9, 40)
    assert sol.J == pytest.approx(J_ref, rel=1e-10)
    assert _rel(sol.grad.reshape(15, 3), g_ref) < 1e-10


@pytest.mark.parametrize("make_policy", [
    lambda S, A: random_policy(S, A, seed=1), lambda S, A: mlp(S, A, hidden=5, seed=2)],
    ids=["tabular", "mlp"])
@pytest.mark.parametrize("gamma", [0.0, 0.8, 1.0])
def test_autograd_matches_policy_gradient_theorem(tiny, make_policy, gamma):
    policy = make_policy(tiny.n_states, tiny.n_actions)
    sol = solve(tiny, policy, gamma, 6)
    assert torch.allclose(sol.grad, pgt_gradient(sol, policy), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make_policy", [
    lambda S, A: random_policy(S, A, seed=1), lambda S, A: mlp(S, A, hidden=4, seed=2)],
    ids=["tabular", "mlp"])
def test_autograd_matches_finite_differences(tiny, make_policy):
    policy = make_policy(tiny.n_states, tiny.n_actions)
    sol = solve(tiny, policy, 0.9, 7)
    eps = 1e-6
    fd = torch.zeros_like(policy.params)
    for i in range(policy.n_params):
        step = torch.zeros_like(policy.params)
        step[i] = eps
        plus = objective(tiny, policy, 0.9, 7, policy.params + step)
        minus = objective(tiny, policy, 0.9, 7, policy.params - step)
        fd[i] = (plus - minus) / (2 * eps)
    assert torch.allclose(sol.grad, fd, atol=1e-8)


def test_objective_equals_enumeration_of_every_trajectory(tiny):
    """J = sum over all (s_0, a_0, ..., s_H) paths of probability x discounted return."""
    policy = random_policy(tiny.n_states, tiny.n_actions, seed=4)
    gamma, H = 0.9, 4
    pi = policy.probs().detach()
    S, A = tiny.n_states, tiny.n_actions
    total = 0.0
    for path in itertools.product(range(S), *([range(A), range(S)] * H)):
        prob, ret, alive = float(tiny.rho0[path[0]]), 0.0, True
        for t in range(H):
            s, a, s2 = path[2 * t], path[2 * t + 1], path[2 * t + 2]
            if not alive:  # after termination the path must stay put: count it once
                if (a, s2) != (0, 0):
                    prob = 0.0
                continue
            prob *= float(pi[s, a] * tiny.P[s, a, s2])
            ret += gamma**t * float(tiny.R[s, a, s2])
            alive = not bool(tiny.terminated[s, a, s2])
        total += prob * ret
    assert solve(tiny, policy, gamma, H).J == pytest.approx(total, rel=1e-12)


def test_occupancy_and_values_are_consistent(tiny):
    policy = random_policy(tiny.n_states, tiny.n_actions, seed=0)
    gamma, H = 0.95, 8
    sol = solve(tiny, policy, gamma, H)
    r_pi = (sol.pi * tiny.expected_reward()).sum(-1)
    J_forward = sum(gamma**t * float(sol.d[t] @ r_pi) for t in range(H))
    assert sol.J == pytest.approx(J_forward, rel=1e-12)
    assert torch.allclose((sol.pi * sol.advantage).sum(-1), torch.zeros(H, tiny.n_states,
                          dtype=torch.float64), atol=1e-12)
    assert sol.d.sum(-1).max().item() <= 1 + 1e-12


def test_objective_matches_monte_carlo():
    mdp = make_mdp("FrozenLake-v1")
    policy = random_policy(16, 4, temperature=1.0, seed=0)
    sol = solve(mdp, policy, 0.95, 50)
    batch = sample(mdp, sol.pi, 50, 200_000, seed=11, device="cpu")
    G = batch.returns(0.95)
    z = (G.mean().item() - sol.J) / (G.std().item() / len(G) ** 0.5)
    assert abs(z) < 4.0


def test_optimal_return_bounds_every_policy():
    mdp = make_mdp("FrozenLake-v1")
    best = optimal_return(mdp, 0.99, 30)
    for seed in range(3):
        assert solve(mdp, random_policy(16, 4, seed=seed), 0.99, 30).J <= best
    assert solve(mdp, uniform(16, 4), 0.99, 30).J < best
    # deterministic 4x4 lake: the shortest path takes 6 steps
    det = make_mdp("FrozenLake-v1:is_slippery=false")
    assert optimal_return(det, 0.9, 30) == pytest.approx(0.9**5)


def test_horizon_one_gradient_is_the_bandit_gradient():
    mdp = tiny_mdp(seed=2)
    policy = random_policy(3, 2, seed=5)
    sol = solve(mdp, policy, 0.5, 1)
    pi, r = sol.pi, mdp.expected_reward()
    v = (pi * r).sum(-1, keepdim=True)
    expected = mdp.rho0[:, None] * pi * (r - v)
    assert torch.allclose(sol.grad.reshape(3, 2), expected, atol=1e-15)
