"""Every registered estimator's claim, proved by exact enumeration on tiny MDPs.

Each test is parametrised over the registry, so a new estimator is tested without anyone
remembering to add it here.
"""

import pytest
import torch

import estimators
from estimators import Context
from suite.core.contraction import Contraction
from suite.core.errors import InputError
from suite.core.exact import solve
from suite.core.policies import mlp, random_policy

from .conftest import tiny_mdp
from .enumerate import all_pairs, all_trajectories

H = 3
CASES = {  # name -> (mdp seed, S, terminating, gamma)
    "terminating": (1, 3, True, 0.8),
    "continuing": (2, 2, False, 0.7),
}
_CACHE: dict = {}


def exact_expectation(est, case: str, policy_kind: str = "tabular") -> tuple[torch.Tensor, object]:
    """E[g_hat] over every pair of trajectories (batches of B = 2) and the estimator's own
    randomness, and the exact solution."""
    key = (case, policy_kind)
    if key not in _CACHE:
        seed, S, terminating, gamma = CASES[case]
        mdp = tiny_mdp(seed=seed, S=S, terminating=terminating)
        policy = (random_policy(S, 2, seed=seed) if policy_kind == "tabular"
                  else mlp(S, 2, hidden=3, seed=seed))
        sol = solve(mdp, policy, gamma, H)
        batch, probs = all_pairs(*all_trajectories(mdp, sol.pi, H))
        contraction = Contraction(policy, torch.device("cpu")).for_batch(batch)
        _CACHE[key] = (Context(batch, gamma, sol, contraction, 2, mdp=mdp), probs, sol)
    ctx, probs, sol = _CACHE[key]
    X = est.gradients(ctx, expectation=True).dense()  # [2 * pairs, P]
    pair_mean = X.reshape(-1, 2, X.shape[1]).mean(1)
    return probs @ pair_mean, sol


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", estimators.names())
def test_claim_holds_exactly(name, case):
    est = estimators.get(name)
    expectation, sol = exact_expectation(est, case)
    gap = (expectation - sol.grad).norm() / sol.grad.norm()
    if est.claims_unbiased(sol.gamma):
        assert gap < 1e-9, f"{name} claims to be unbiased but E - grad J = {gap:.3e} |grad J|"
    else:
        assert gap > 1e-6, f"{name} claims a bias but E matches grad J ({gap:.3e})"


@pytest.mark.parametrize("name", estimators.names())
def test_claims_hold_for_a_non_tabular_policy(name):
    est = estimators.get(name)
    expectation, sol = exact_expectation(est, "terminating", "mlp")
    gap = (expectation - sol.grad).norm() / sol.grad.norm()
    assert (gap < 1e-9) == est.claims_unbiased(sol.gamma)


def _missing_discount_gradient(sol, policy):
    """sum_t sum_s d_t(s) sum_a grad pi(a|s) Q_t(s, a): the missing-discount expectation."""
    weight = (sol.d[:, :, None] * sol.Q).sum(0)
    theta = policy.params.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((policy.probs(theta) * weight).sum(), theta)
    return grad


@pytest.mark.parametrize("case", list(CASES))
def test_missing_discount_closed_form(case):
    seed, S, _, _ = CASES[case]
    expectation, sol = exact_expectation(estimators.get("reward_to_go_missing_discount"), case)
    closed = _missing_discount_gradient(sol, random_policy(S, 2, seed=seed))
    assert torch.allclose(expectation, closed, rtol=1e-10, atol=1e-13)


def test_single_step_closed_form_without_termination():
    seed, S, _, _ = CASES["continuing"]
    expectation, sol = exact_expectation(estimators.get("final_formula_single_step"), "continuing")
    closed = _missing_discount_gradient(sol, random_policy(S, 2, seed=seed)) / H
    assert torch.allclose(expectation, closed, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case", list(CASES))
def test_batch_mean_baseline_shrinks_by_b_minus_one_over_b(case):
    expectation, sol = exact_expectation(estimators.get("batch_mean_baseline"), case)
    assert torch.allclose(expectation, sol.grad * (2 - 1) / 2, rtol=1e-10, atol=1e-14)


def test_unbiased_at_gamma_one_for_the_missing_discount():
    est = estimators.get("reward_to_go_missing_discount")
    assert est.claims_unbiased(1.0) and not est.claims_unbiased(0.99)


def test_registry_lookup_errors_and_specs():
    with pytest.raises(InputError, match="did you mean 'reinforce'"):
        estimators.get("reinfroce")
    est = estimators.get("gae:lambda=0.3,critic=perturbed,sigma=0.2")
    assert not est.claims_unbiased(0.9)
    assert estimators.get("gae:lambda=1,critic=timeless").claims_unbiased(0.9)
    with pytest.raises(InputError, match="lambda must lie in"):
        estimators.get("gae:lambda=2")
    assert [e.name for e in estimators.resolve("q_oracle,gae:lambda=0.5,critic=exact")] == [
        "reinforce", "q_oracle", "gae:lambda=0.5,critic=exact"]


def test_every_entry_documents_itself():
    """Formula, claim and source in the registry, a docstring on its function, and its row in
    docs/estimators.md saying the same (a missing or stale row fails)."""
    import inspect
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "estimators.md").read_text()
    for name in estimators.names():
        est = estimators.get(name)
        assert est.formula and est.reference and est.condition, name
        assert inspect.getdoc(est.fn), f"{name}: its function has no docstring"
        row = f"| `{name}` | {est.formula} | {est.condition} | {est.reference} |"
        assert row.replace("|", "").strip() and row in text, \
            f"docs/estimators.md lacks the row of {name} (or it is stale): {row}"


def test_single_step_draws_match_their_expectation():
    """The sampled t* of the single-step estimators averages to the exact expectation."""
    mdp = tiny_mdp(seed=3)
    policy = random_policy(3, 2, seed=0)
    sol = solve(mdp, policy, 0.9, 5)
    from suite.core.sampler import sample

    batch = sample(mdp, sol.pi, 5, 4000, seed=0, device="cpu")
    ctx = Context(batch, 0.9, sol, Contraction(policy, torch.device("cpu")).for_batch(batch), 2,
                  torch.Generator().manual_seed(0))
    for name in ["final_formula_single_step", "final_formula_rescaled", "pgt_state_sampling"]:
        est = estimators.get(name)
        drawn = torch.stack([est.gradients(ctx).dense() for _ in range(30)]).mean(0).mean(0)
        expected = est.gradients(ctx, expectation=True).dense().mean(0)
        assert (drawn - expected).norm() < 0.1 * expected.norm() + 1e-3, name


def test_docs_list_every_estimator():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "estimators.md").read_text()
    missing = [n for n in estimators.names() if f"`{n}`" not in text]
    assert not missing, f"docs/estimators.md does not describe {missing}"
