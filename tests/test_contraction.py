"""The fast contraction against plain autograd, one trajectory at a time."""

import pytest
import torch

from suite.core.contraction import Contraction, RowGrads
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
    fold = torch.arange(batch.n) % 4  # folds 0-1 and 2-3 pair up
    fitted = rows.cross_fitted(c, fold, 4).dense()
    assert torch.allclose(fitted, dense.cross_fitted(c, fold, 4).values)  # compiled vs generic
    assert not torch.allclose(fitted, rows.times_traj(c).dense())  # must fail: the baseline acts


@pytest.mark.parametrize("kind", ["tabular", "mlp"])
def test_pi_table_contraction_matches_autograd(kind):
    policy, batch, con = _setup(kind)
    D = torch.randn(batch.states.shape[1], 16, 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))

    def loss(policy, theta, i, T):
        s = batch.states[i, :T]
        return (D[torch.arange(T), s] * policy.probs(theta)[s]).sum()

    expected = _autograd_rows(policy, batch, loss)
    assert torch.allclose(con.pi_grad_table(D).dense(), expected, atol=1e-12)


@pytest.mark.parametrize("env", ["FrozenLake8x8-v1", "Taxi-v4"])
def test_compiled_rows_agree_with_the_torch_indexing(env):
    """On the CPU the tabular rows and contractions run compiled (suite.core.rows); the torch
    code they replace (kept for CUDA) gives the same rows and values to float64 rounding."""
    mdp = make_mdp(env)
    policy = random_policy(mdp.n_states, mdp.n_actions, seed=4)
    batch = sample(mdp, policy.probs().detach(), 30, 64, seed=5, device="cpu")
    base = Contraction(policy, torch.device("cpu"))
    fast, slow = base.for_batch(batch), base.for_batch(batch)
    slow._compiled = False
    assert fast._compiled
    for a, b in [(fast.rows.step_row, slow.rows.step_row), (fast.slot, slow.slot),
                 (fast.rows.row_traj, slow.rows.row_traj),
                 (fast.rows.row_state, slow.rows.row_state)]:
        assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(batch.states.shape, dtype=torch.float64, generator=gen)
    c = torch.randn(int(batch.lengths.sum()), mdp.n_actions, dtype=torch.float64, generator=gen)
    D = torch.randn(batch.states.shape[1], mdp.n_states, mdp.n_actions, dtype=torch.float64,
                    generator=gen)
    for x, y in [(fast.score(w), slow.score(w)), (fast.pi_grad(c), slow.pi_grad(c)),
                 (fast.pi_grad_table(D), slow.pi_grad_table(D))]:
        assert torch.allclose(x.values, y.values, rtol=1e-12, atol=1e-12)
    grads, group = fast.score(w), torch.arange(batch.n) % 5
    single = RowGrads(grads.values.float(), grads.rows)  # float32: the torch operations
    b = torch.randn(5, mdp.n_states * mdp.n_actions, dtype=torch.float64, generator=gen)
    cn = torch.randn(batch.n, dtype=torch.float64, generator=gen)
    for x, y in [(grads.group_sum(group, 5), single.group_sum(group, 5)),
                 (grads.times_traj(cn).values, single.times_traj(cn.float()).values),
                 (grads.times_param(b, group).values, single.times_param(b.float(), group).values)]:
        assert torch.allclose(x, y.double(), rtol=1e-5, atol=1e-5)
    moved = base.for_batch(batch)  # a must-fail case: another batch's weights disagree
    other = torch.randn(batch.states.shape, dtype=torch.float64, generator=gen)
    assert not torch.allclose(moved.score(other).values, slow.score(w).values)
