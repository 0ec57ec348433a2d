"""The fast contraction against plain autograd, one trajectory at a time."""

import pytest
import torch

from suite.core.contraction import Contraction
from suite.core.envs import make_mdp
from suite.core.policies import mlp, random_policy
from suite.core.sampler import sample


def _setup(kind):
    mdp = make_mdp("FrozenLake-v1")
    policy = random_policy(16, 4, seed=0) if kind == "tabular" else mlp(16, 4, hidden=6, seed=1)
    pi = policy.probs().detach()
    batch = sample(mdp, pi, 12, 40, seed=0, device="cpu")
    return policy, batch, Contraction(policy, torch.device("cpu")).for_batch(batch)


def _autograd_rows(policy, batch, per_step_loss):
    rows = []
    for i in range(batch.n):
        theta = policy.params.clone().requires_grad_(True)
        T = int(batch.lengths[i])
        loss = per_step_loss(policy, theta, i, T)
        (grad,) = torch.autograd.grad(loss, theta)
        rows.append(grad)
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["tabular", "mlp"])
def test_score_contraction_matches_autograd(kind):
    policy, batch, con = _setup(kind)
    w = torch.randn(batch.states.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(policy, theta, i, T):
        logp = policy.log_probs(theta)[batch.states[i, :T], batch.actions[i, :T]]
        return (w[i, :T] * logp).sum()

    expected = _autograd_rows(policy, batch, loss)
    assert torch.allclose(con.score(w).dense(), expected, atol=1e-12)


@pytest.mark.parametrize("kind", ["tabular", "mlp"])
def test_pi_contraction_matches_autograd(kind):
    policy, batch, con = _setup(kind)
    c = torch.randn(*batch.states.shape, 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))

    def loss(policy, theta, i, T):
        return (c[i, :T] * policy.probs(theta)[batch.states[i, :T]]).sum()

    expected = _autograd_rows(policy, batch, loss)
    assert torch.allclose(con.pi_grad(c[batch.mask]).dense(), expected, atol=1e-12)


def test_grads_operations_agree_between_forms():
    """RowGrads (tabular) and DenseGrads give the same sums, norms and products."""
    from suite.core.contraction import DenseGrads

    policy, batch, con = _setup("tabular")
    w = torch.rand(batch.states.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rows = con.score(w)
    dense = DenseGrads(rows.dense())
    group = torch.arange(batch.n) % 3
    b = torch.randn(3, policy.n_params, dtype=torch.float64)
    c = torch.randn(batch.n, dtype=torch.float64)
    assert torch.allclose(rows.sq_norms(), dense.sq_norms())
    assert torch.allclose(rows.group_sum(group, 3), dense.group_sum(group, 3))
    assert torch.allclose(rows.times_traj(c).dense(), dense.times_traj(c).values)
    assert torch.allclose(rows.times_param(b, group).dense(), dense.times_param(b, group).values)
    assert torch.allclose((rows.square() - rows).dense(), (dense.square() - dense).values)
