"""The group estimators of LLM fine-tuning and their exact moments, proved by enumerating every group.

Every (estimator, aggregation mode) is evaluated on every ordered group of B = 2 and 3
trajectories of tiny MDPs (with and without termination), with and without a shared start;
its exact expectation must match its claim, the closed forms must hold to 1e-10, and
suite.core.group_moments must reproduce the brute-force first and second moments to 1e-10.
"""

import math

import pytest
import torch

import estimators
from estimators import Context
from estimators.groups import AGG_MODES
from suite.core.contraction import Contraction
from suite.core.envs import make_mdp
from suite.core.exact import solve
from suite.core.group_moments import (
    RULES,
    enumerate_paths,
    group_moments,
    group_moments_by_start,
    grpo_binary_scale,
    outcome_table,
)
from suite.core.moments import NoExact
from suite.core.policies import mlp, random_policy, uniform
from suite.core.sampler import sample
from suite.harness.measure import measure

from .conftest import tiny_mdp
from .enumerate import all_groups, all_trajectories

# every registered advantage estimator (an entry with a loss aggregation mode): new ones are
# tested without being listed here
GROUP_ESTIMATORS = [n for n in estimators.names() if "agg" in estimators.get(n).params]
H = 2
CASES = {"terminating": (1, True, 0.8), "continuing": (2, False, 0.7)}  # seed, terminating, gamma
_CACHE: dict = {}


def _problem(case: str, policy_kind: str = "tabular"):
    seed, terminating, gamma = CASES[case]
    mdp = tiny_mdp(seed=seed, S=2, terminating=terminating)
    policy = random_policy(2, 2, seed=seed) if policy_kind == "tabular" else mlp(2, 2, hidden=3,
                                                                                  seed=seed)
    return mdp, policy, solve(mdp, policy, gamma, H)


def brute_force(spec: str, case: str, B: int, shared: bool, policy_kind: str = "tabular"):
    """(E[g_B], E|g_B|^2, E|X_1|^2, exact solution) over every group of B trajectories."""
    key = (case, B, shared, policy_kind)
    if key not in _CACHE:
        mdp, policy, sol = _problem(case, policy_kind)
        batch, prob = all_groups(*all_trajectories(mdp, sol.pi, H), B, mdp.rho0 if shared else None)
        ctx = Context(batch, sol.gamma, sol, Contraction(policy, torch.device("cpu")).for_batch(batch),
                      B, mdp=mdp)
        _CACHE[key] = (ctx, prob, sol)
    ctx, prob, sol = _CACHE[key]
    X = estimators.get(spec).gradients(ctx).dense().reshape(-1, B, sol.grad.shape[0])
    g = X.mean(1)
    return prob @ g, float(prob @ (g**2).sum(1)), float(prob @ (X[:, 0] ** 2).sum(1)), sol


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_every_mode_proves_its_claim(name, case):
    for B in (2, 3):
        for shared in (False, True):
            for mode in AGG_MODES:
                est = estimators.get(f"{name}:agg={mode}")
                mean, _, _, sol = brute_force(est.name, case, B, shared)
                gap = float((mean - sol.grad).norm() / sol.grad.norm())
                where = f"{est.name}, B={B}, shared start {shared}: E - grad J = {gap:.2e} |grad J|"
                if est.claims_unbiased(sol.gamma):
                    assert gap < 1e-10, f"claims unbiased but {where}"
                else:
                    assert gap > 1e-6, f"claims a bias but {where}"


def test_member_weights_give_the_frameworks_loss_gradient():
    """The batch mean of the members' estimates is minus the gradient of the framework's loss,
    sum over the batch's steps of -A_it log pi(a_t|s_t) aggregated by the mode (autograd)."""
    mdp = make_mdp("tokens:vocab=2,max_len=4,prompts=2")
    policy = random_policy(mdp.n_states, mdp.n_actions, seed=0)
    sol = solve(mdp, policy, 1.0, 4)
    B = 4
    batch = sample(mdp, sol.pi, 4, 64, seed=0, device="cpu", group_size=B)
    ctx = Context(batch, 1.0, sol, Contraction(policy, torch.device("cpu")).for_batch(batch), B,
                  mdp=mdp)
    mask = batch.mask.double()
    L = mask.sum(1).reshape(-1, B)
    theta = policy.params.detach().clone().requires_grad_(True)
    logp = policy.log_probs(theta)[batch.states, batch.actions] * mask  # [N, T]
    for name in GROUP_ESTIMATORS:
        A = estimators.get(f"{name}:agg=token-sum").weights(ctx).detach() * mask
        per_seq = (A * logp).sum(1).reshape(-1, B)  # [groups, B]: sum_t A_it log pi
        losses = {"token-sum": -per_seq.mean(1), "seq-mean-token-mean": -(per_seq / L).mean(1),
                  "token-mean": -per_seq.sum(1) / L.sum(1),
                  "seq-mean-token-sum-norm": -(per_seq / 4).mean(1)}
        for mode, loss in losses.items():
            (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
            X = estimators.get(f"{name}:agg={mode}").gradients(ctx).dense()
            total = X.reshape(-1, B, X.shape[1]).mean(1).sum(0)  # sum of the batch estimates
            assert torch.allclose(total, -grad, rtol=1e-10, atol=1e-13), (name, mode)


def test_plain_names_use_their_sources_mode():
    modes = {n: estimators.get(n).params["agg"] for n in GROUP_ESTIMATORS}
    assert modes == {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                     "rloo": "token-sum", "reinforce_pp": "token-mean",
                     "reinforce_pp_baseline": "token-mean", "remax": "token-sum",
                     "ppo_advantage_normalization": "token-mean", "opo": "token-mean"}
    for n in GROUP_ESTIMATORS:  # the plain name is its family member with the source's mode
        mean, second, _, _ = brute_force(n, "terminating", 2, False)
        mean2, second2, _, _ = brute_force(f"{n}:agg={modes[n]}", "terminating", 2, False)
        assert torch.equal(mean, mean2) and second == second2


@pytest.mark.parametrize("case", list(CASES))
def test_closed_forms_of_the_baselines(case):
    for B in (2, 3):
        for shared in (False, True):
            dr, _, _, sol = brute_force("dr_grpo:agg=token-sum", case, B, shared)
            assert torch.allclose(dr, (1 - 1 / B) * sol.grad, rtol=1e-10, atol=1e-14)
            norm, _, _, _ = brute_force("rloo:agg=seq-mean-token-sum-norm", case, B, shared)
            assert torch.allclose(norm, sol.grad / H, rtol=1e-10, atol=1e-14)
    if case == "continuing":  # every length is H: the per-length means are 1/H too
        for spec in ("rloo:agg=seq-mean-token-mean", "rloo:agg=token-mean"):
            mean, _, _, sol = brute_force(spec, case, 3, False)
            assert torch.allclose(mean, sol.grad / H, rtol=1e-10, atol=1e-14)


def _binary_task(G: int):
    """One prompt, a 0/1 verdict: every group of G responses of tokens:vocab=2,max_len=2."""
    mdp = make_mdp("tokens:vocab=2,max_len=2,prompts=1,pass_first=0.4")
    policy = random_policy(mdp.n_states, mdp.n_actions, seed=3)
    sol = solve(mdp, policy, 1.0, 2)
    batch, prob = all_groups(*all_trajectories(mdp, sol.pi, 2), G)
    ctx = Context(batch, 1.0, sol, Contraction(policy, torch.device("cpu")).for_batch(batch), G,
                  mdp=mdp)
    return mdp, policy, sol, ctx, prob


@pytest.mark.parametrize("G", [2, 3, 4])
def test_grpo_binary_reward_one_prompt_scales_grad_p_by_omega(G):
    mdp, policy, sol, ctx, prob = _binary_task(G)
    p = sol.J  # one prompt, reward 0/1: J = P(correct), grad J = grad p
    X = estimators.get("grpo:agg=token-sum").gradients(ctx).dense()
    mean = prob @ X.reshape(-1, G, X.shape[1]).mean(1)
    omega = grpo_binary_scale(G, p)
    assert torch.allclose(mean, omega * sol.grad, rtol=1e-10, atol=1e-15)
    gm = group_moments(outcome_table(mdp, policy, sol), "grpo", "token-sum", G)
    assert torch.allclose(gm.mean, omega * sol.grad, rtol=1e-10, atol=1e-15)


def test_difficulty_bias_per_prompt():
    """Shared start, 0/1 reward: the group answering prompt s has mean omega_G(p_s) grad p_s, and
    the groups together weigh each prompt's gradient by its omega (grad J weighs them by 1)."""
    mdp = make_mdp("tokens:vocab=2,max_len=3,prompts=3,pass_first=0.8,pass_last=0.1")
    policy = random_policy(mdp.n_states, mdp.n_actions, seed=5)
    sol = solve(mdp, policy, 1.0, 3)
    table = outcome_table(mdp, policy, sol)
    G = 6
    by_start = group_moments_by_start(table, "grpo", "token-sum", G)
    weighted = torch.zeros_like(sol.grad)
    for s, mom in by_start.items():
        p = table.start_return(s)
        expected = grpo_binary_scale(G, p) * table.start_gradient(s)
        assert torch.allclose(mom.mean, expected, rtol=1e-10, atol=1e-15), s
        weighted += float(mdp.rho0[s]) * expected
    assert torch.allclose(sum(float(mdp.rho0[s]) * table.start_gradient(s) for s in by_start),
                          sol.grad, rtol=1e-12, atol=1e-15)
    shared = group_moments(table, "grpo", "token-sum", G, shared_start=True)
    assert torch.allclose(shared.mean, weighted, rtol=1e-10, atol=1e-15)
    assert len({round(grpo_binary_scale(G, table.start_return(s)), 6) for s in by_start}) == 3


def test_omega_table_of_the_design_note():
    # GRPO's eps = 1e-6 shifts omega by ~1e-6 relative: omega_2 = 0.5 / (1/sqrt(2) + eps)
    for p in (0.01, 0.3, 0.5, 0.9):
        assert grpo_binary_scale(2, p) == pytest.approx(0.5 / (1 / math.sqrt(2) + 1e-6), rel=1e-12)
        assert grpo_binary_scale(2, p, eps=0.0) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    for p, omega in ((0.05, 2.313), (0.3, 1.836), (0.5, 1.736)):
        assert round(grpo_binary_scale(8, p), 3) == omega
    assert grpo_binary_scale(4096, 0.3) == pytest.approx(1 / math.sqrt(0.3 * 0.7), rel=1e-3)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(RULES))
def test_group_moments_match_every_group(name, case):
    mdp, policy, sol = _problem(case)
    table = outcome_table(mdp, policy, sol)
    for B in (2, 3):
        for shared in (False, True):
            for mode in AGG_MODES:
                mean, second, member, _ = brute_force(f"{name}:agg={mode}", case, B, shared)
                gm = group_moments(table, name, mode, B, shared)
                where = f"{name}:agg={mode}, B={B}, shared {shared}"
                assert float((gm.mean - mean).norm()) <= 1e-10 * float(mean.norm()) + 1e-15, where
                assert torch.equal(gm.mean, gm.batch_mean)
                assert gm.batch_second_moment == pytest.approx(second, rel=1e-10), where
                assert gm.second_moment == pytest.approx(member, rel=1e-10), where


def test_group_moments_for_a_non_tabular_policy():
    mdp, policy, sol = _problem("terminating", "mlp")
    table = outcome_table(mdp, policy, sol)
    for name, mode in (("grpo", "seq-mean-token-mean"), ("opo", "token-mean")):
        mean, second, _, _ = brute_force(f"{name}:agg={mode}", "terminating", 3, True, "mlp")
        gm = group_moments(table, name, mode, 3, shared_start=True)
        assert torch.allclose(gm.mean, mean, rtol=1e-10, atol=1e-15)
        assert gm.batch_second_moment == pytest.approx(second, rel=1e-10)


def test_outcome_table_is_the_tree_of_trajectories():
    mdp, policy, sol = _problem("terminating")
    table = outcome_table(mdp, policy, sol)
    assert float(table.prob.sum()) == pytest.approx(1.0, abs=1e-14)
    assert torch.allclose(table.u.sum(0), torch.zeros_like(sol.grad), atol=1e-14)  # grad of 1
    assert torch.allclose(table.ret @ table.u, sol.grad, rtol=1e-12)  # grad E[R] = grad J
    batch, prob = enumerate_paths(mdp, sol.pi, H)
    ref, ref_prob = all_trajectories(mdp, sol.pi, H)
    assert batch.n == ref.n and float(prob.sum()) == pytest.approx(1.0, abs=1e-14)


def test_no_exact_value_names_the_reason():
    mdp, policy, sol = _problem("continuing")
    table = outcome_table(mdp, policy, sol)
    for name in ("reinforce_pp", "ppo_advantage_normalization"):
        out = group_moments(table, name, "token-mean", 4)
        assert isinstance(out, NoExact) and "not a function of the members" in out.reason
    assert isinstance(group_moments(table, "reinforce", "token-sum", 4), NoExact)


def test_sampled_group_statistics_agree_with_the_exact_moments():
    """measure on the token MDP, shared start: mean within its exact standard error, batch
    variance within 10%."""
    mdp = make_mdp("tokens:vocab=2,max_len=3,prompts=2,pass_first=0.7,pass_last=0.2")
    policy = uniform(mdp.n_states, mdp.n_actions)
    sol = solve(mdp, policy, 1.0, 3)
    table = outcome_table(mdp, policy, sol)
    names = ["grpo", "dr_grpo", "rloo", "opo", "remax", "reinforce_pp_baseline"]
    N, B = 16_000, 4
    result = measure(mdp, policy, sol, estimators.resolve(names), N, B, seed=1, device="cpu",
                     shared_start=True)
    for name in names:
        est = estimators.get(name)
        gm = group_moments(table, name, est.params["agg"], B, shared_start=True)
        z2 = float(((torch.as_tensor(result.means[name]) - gm.mean) ** 2).sum()) \
            / (gm.batch_variance / (N // B))  # about 1 on average; > 4 rarely
        assert z2 < 4, (name, z2)
        assert result.stats[name].sampled.batch_variance == pytest.approx(gm.batch_variance,
                                                                          rel=0.1), name


def test_trajectories_are_counted_before_they_are_enumerated():
    """count_paths equals the enumeration where it fits; a large MDP is refused from the count
    (2.6e48 trajectories for FrozenLake at H 50), before anything is built."""
    from suite.core.errors import InputError
    from suite.core.group_moments import count_paths, enumerate_paths

    from .conftest import tiny_mdp

    for mdp, H in [(tiny_mdp(seed=1, S=3), 4), (tiny_mdp(seed=2, S=2, terminating=False), 3),
                   (make_mdp("tokens:vocab=2,max_len=5,prompts=2"), 5)]:
        pi = random_policy(mdp.n_states, mdp.n_actions, seed=0).probs()
        assert count_paths(mdp, pi, H) == enumerate_paths(mdp, pi, H)[0].n
    with pytest.raises(InputError, match="2.62e[+]48 at horizon 50, more than 1,000,000"):
        enumerate_paths(make_mdp("FrozenLake-v1"), uniform(16, 4).probs(), 50)


def test_too_much_pair_work_gives_no_exact_moments_with_the_reason(monkeypatch):
    """The E|g|^2 pair loop is bounded: over the bound the answer is NoExact with why, not minutes
    of work; under it the same call gives the moments."""
    import suite.core.group_moments as gm_module

    mdp, policy, sol, _, _ = _binary_task(3)
    table = outcome_table(mdp, policy, sol)
    assert not isinstance(group_moments(table, "grpo", "token-sum", 3), NoExact)
    monkeypatch.setattr(gm_module, "MAX_PAIR_WORK", 1)
    refused = group_moments(table, "grpo", "token-sum", 3)
    assert isinstance(refused, NoExact) and "pairs of outcomes" in refused.reason
