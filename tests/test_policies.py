import numpy as np
import pytest
import torch

from suite.core.envs import make_mdp
from suite.core.errors import InputError
from suite.core.exact import objective, optimal_return
from suite.core.policies import mlp, uniform
from suite.harness.problem import make_policy


def test_uniform_random_and_mlp_are_distributions():
    mdp = make_mdp("FrozenLake-v1")
    for spec in ["uniform", "random:temperature=0.5,seed=3", "mlp:hidden=8,seed=1"]:
        pi = make_policy(spec, mdp, 0.9, 10).probs()
        assert pi.shape == (16, 4) and pi.dtype == torch.float64
        assert torch.allclose(pi.sum(-1), torch.ones(16, dtype=torch.float64))
    assert torch.allclose(uniform(16, 4).probs(), torch.full((16, 4), 0.25, dtype=torch.float64))


def test_mlp_is_not_tabular_and_shares_parameters():
    policy = mlp(10, 3, hidden=4, seed=0)
    assert not policy.tabular and policy.n_params == 11 * 4 + 5 * 3
    bumped = policy.params.clone()
    bumped[-1] += 1.0  # output bias of action 2 moves every state's distribution
    changed = (policy.probs(bumped) - policy.probs()).abs().sum(-1) > 0
    assert changed.all()


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.8])
def test_trained_policy_reaches_the_requested_fraction(fraction):
    mdp = make_mdp("FrozenLake-v1")
    gamma, H = 0.95, 40
    policy = make_policy(f"trained:fraction={fraction}", mdp, gamma, H)
    J_u = float(objective(mdp, uniform(16, 4), gamma, H))
    J_star = optimal_return(mdp, gamma, H)
    J = float(objective(mdp, policy, gamma, H))
    assert (J - J_u) / (J_star - J_u) == pytest.approx(fraction, abs=1e-8)


def test_npy_policy_and_its_errors(tmp_path):
    mdp = make_mdp("FrozenLake-v1")
    good = tmp_path / "good.npy"
    np.save(good, np.arange(64.0).reshape(16, 4))
    assert torch.equal(make_policy(str(good), mdp, 0.9, 5).params, torch.arange(64.0,
                       dtype=torch.float64))
    np.save(tmp_path / "shape.npy", np.zeros((4, 16)))
    with pytest.raises(InputError, match=r"shape \[S, A\] = \[16, 4\]"):
        make_policy(str(tmp_path / "shape.npy"), mdp, 0.9, 5)
    np.save(tmp_path / "nan.npy", np.full((16, 4), np.nan))
    with pytest.raises(InputError, match="finite"):
        make_policy(str(tmp_path / "nan.npy"), mdp, 0.9, 5)


@pytest.mark.parametrize("spec, message", [
    ("unifrom", "did you mean 'uniform'"),
    ("trained:fraction=1.5", r"fraction must lie in \[0, 1\)"),
    ("random:temperature=0", "temperature must be > 0"),
    ("random:temp=2", "unknown option"),
])
def test_bad_policy_specs(spec, message):
    with pytest.raises(InputError, match=message):
        make_policy(spec, make_mdp("FrozenLake-v1"), 0.9, 10)
