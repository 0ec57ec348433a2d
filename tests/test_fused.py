"""The compiled kernels (suite.core.fused, suite.core.scan) against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import estimators
from estimators import Context
from suite.core.contraction import Contraction, DenseGrads
from suite.core.envs import make_mdp
from suite.core.exact import solve
from suite.core.fused import FusedMoments
from suite.core.policies import random_policy
from suite.core.sampler import ChunkSampler
from suite.core.scan import inverse_cdf, sum_to_go, sum_to_go_torch, td_errors, td_errors_torch
from suite.core.stats import SUMS, ChunkIndex, Moments, block_factors
from suite.harness.measure import measure
from suite.harness.problem import make_policy

from .conftest import tiny_mdp


def _close(a: Moments, b: Moments, rtol: float = 1e-11) -> None:
    for name in SUMS:
        x, y = getattr(a, name), getattr(b, name)
        scale = float(x.abs().max()) or 1.0
        assert float((x - y).abs().max()) <= rtol * scale, name


@pytest.mark.parametrize("env,spec,B,n,shared", [
    ("FrozenLake-v1", "trained:fraction=0.5", 10, 20_000, False),
    ("CliffWalking-v1", "uniform", 4, 4_000, False),
    ("FrozenLake-v1", "uniform", 40, 4_000, False),  # batches of several blocks of 16
    ("tokens:vocab=3,max_len=3,prompts=2", "uniform", 4, 4_000, True),
])
def test_fused_sums_equal_the_torch_path(env, spec, B, n, shared):
    """Every estimator, every sum (groups, batches, blocks of k batches): the kernels and the
    contraction + Moments.add agree to float64 rounding; blocks span the kernels' pieces."""
    mdp = make_mdp(env)
    policy = make_policy(spec, mdp, 0.99, 20)
    sol = solve(mdp, policy, 0.99, 20)
    chosen = estimators.resolve("all")
    runs = [measure(mdp, policy, sol, chosen, n, B, seed=3, device="cpu", fused=f,
                    shared_start=shared) for f in (True, False)]
    assert runs[0].totals.keys() == runs[1].totals.keys()
    for name in runs[0].totals:
        _close(runs[0].totals[name], runs[1].totals[name])
        assert float(runs[0].totals[name].blocks[:, 0].sum()) > 0  # blocks were counted


def _setup(n: int, B: int, S: int = 3, A: int = 2, seed: int = 3, factors=None):
    """A tiny problem, one chunk of n trajectories and an empty Moments for batches of B."""
    mdp = tiny_mdp(seed=seed, S=S, A=A)
    policy = random_policy(S, A, seed=seed)
    sol = solve(mdp, policy, 0.9, 5)
    M = n // B
    template = Moments(policy.n_params, B, M, factors or block_factors(M, B), torch.device("cpu"))
    batch = ChunkSampler(mdp, sol.pi, sol.horizon, n, seed=1, device="cpu", chunk_size=n).chunk(0)
    return sol, template, batch, Contraction(policy, torch.device("cpu"))


def test_pieces_of_any_whole_number_of_batches_give_the_same_sums():
    """The kernels carry blocks from piece to piece: cutting a chunk anywhere between batches
    changes nothing, to the last bit."""
    n, B = 1280, 5
    sol, template, batch, con = _setup(n, B, S=4, A=3, seed=2)
    chosen = [estimators.get(name) for name in ("reinforce", "gae", "leave_one_out_baseline")]

    def run(piece: int) -> dict[str, Moments]:
        fused = FusedMoments(template, con.pi, sol.grad)
        for start in range(0, n, piece):
            part = batch.rows(start, start + piece)
            ctx = Context(part, 0.9, sol, con.for_batch(part), B)
            fused.add_weights([(e.name, e.output(ctx)) for e in chosen], part, start)
        return fused.finish(0, n)

    whole, cut = run(n), run(15)
    for name in whole:
        for s in SUMS:
            assert torch.equal(getattr(whole[name], s), getattr(cut[name], s)), (name, s)


def test_gradients_in_dense_form_fold_like_rows():
    """A Grads that is not RowGrads goes through its dense rows: same sums as Moments.add."""
    n, B = 400, 4
    sol, template, batch, con = _setup(n, B)
    ctx = Context(batch, 0.9, sol, con.for_batch(batch), B)
    rows = estimators.get("all_action").gradients(ctx)
    dense = DenseGrads(rows.dense())
    fused = FusedMoments(template, con.pi, sol.grad)
    fused.add_grads("rows", rows, 0)
    fused.add_grads("dense", dense, 0)
    out = fused.finish(0, n)
    reference = template.empty_like()
    reference.add(rows, 0, sol.grad, ChunkIndex.build(0, n, B, n // B, torch.device("cpu")))
    _close(out["rows"], reference)
    _close(out["dense"], reference)


def test_fused_pieces_must_hold_whole_batches_and_the_same_estimators():
    sol, template, batch, con = _setup(40, 4, factors=[1])
    ctx = Context(batch, 0.9, sol, con.for_batch(batch), 4)
    w = estimators.get("reinforce").output(ctx)
    fused = FusedMoments(template, con.pi, sol.grad)
    with pytest.raises(ValueError, match="whole batches of 4"):
        fused.add_weights([("reinforce", w[:6])], batch.rows(0, 6), 0)
    fused.add_weights([("reinforce", w)], batch, 0)
    with pytest.raises(ValueError, match="the weights of"):
        fused.add_weights([("other", w)], batch, 40)


def test_a_wrong_weight_changes_the_fused_sums():
    """The comparison above could not pass if the kernel ignored its input: one changed weight
    in one trajectory moves the sums away from the torch reference."""
    n, B = 200, 4
    sol, template, batch, con = _setup(n, B, factors=[1, 4])
    ctx = Context(batch, 0.9, sol, con.for_batch(batch), B)
    w = estimators.get("reward_to_go").output(ctx).clone()
    reference = template.empty_like()
    reference.add(ctx.score(w), 0, sol.grad, ChunkIndex.build(0, n, B, n // B, torch.device("cpu")))
    w[7, 0] += 1.0
    fused = FusedMoments(template, con.pi, sol.grad)
    fused.add_weights([("reward_to_go", w)], batch, 0)
    with pytest.raises(AssertionError):
        _close(fused.finish(0, n)["reward_to_go"], reference)


def test_constant_weights_fold_as_a_multiple_of_the_score():
    """A weighting constant along each trajectory (a column expanded: stride 0) is folded as
    that constant times the score: the same sums as the materialised weights, mixed in any order
    with varying ones; a piece that breaks the constancy is refused."""
    n, B = 200, 4
    sol, template, batch, con = _setup(n, B, factors=[1, 5])
    ctx = Context(batch, 0.9, sol, con.for_batch(batch), B)
    column = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expanded = column.expand_as(batch.rewards)
    varying = estimators.get("reward_to_go").output(ctx)
    fast = FusedMoments(template, con.pi, sol.grad)
    fast.add_weights([("c", expanded), ("v", varying), ("c1", column)], batch, 0)
    slow = FusedMoments(template, con.pi, sol.grad)
    slow.add_weights([("c", expanded.contiguous()), ("v", varying),
                      ("c1", expanded.contiguous())], batch, 0)
    out, ref = fast.finish(0, n), slow.finish(0, n)
    for name in ("c", "v", "c1"):
        _close(out[name], ref[name], rtol=1e-12)
    with pytest.raises(AssertionError):  # must fail: another constant gives other sums
        _close(out["c"], ref["v"])
    again = FusedMoments(template, con.pi, sol.grad)
    again.add_weights([("c", expanded[:100])], batch.rows(0, 100), 0)
    with pytest.raises(ValueError, match="constant along each trajectory"):
        again.add_weights([("c", expanded[100:].contiguous())], batch.rows(100, 200), 100)


@pytest.mark.parametrize("name", ["final_formula_single_step", "pgt_state_sampling"])
def test_single_steps_are_the_same_draw_and_fold_like_their_weights(name):
    """A drawn single step kept sparse (SingleSteps) is the draw of the dense weights, from the
    same generator, and the kernel folds it to the same sums."""
    n, B = 200, 4
    sol, template, batch, con = _setup(n, B, factors=[1, 5])
    ctx = Context(batch, 0.9, sol, con.for_batch(batch), B)
    est = estimators.get(name)
    sparse = est.output(ctx, generator=torch.Generator().manual_seed(8), sparse=True)
    dense = est.output(ctx, generator=torch.Generator().manual_seed(8))
    assert torch.equal(sparse.weights(batch.states.shape[1]), dense)
    assert int((sparse.t >= 0).sum()) > n // 2  # most trajectories drew a step
    fast = FusedMoments(template, con.pi, sol.grad)
    fast.add_weights([("s", sparse), ("v", dense * 2.0)], batch, 0)
    slow = FusedMoments(template, con.pi, sol.grad)
    slow.add_weights([("s", dense), ("v", dense * 2.0)], batch, 0)
    out, ref = fast.finish(0, n), slow.finish(0, n)
    _close(out["s"], ref["s"], rtol=1e-12)
    with pytest.raises(AssertionError):  # must fail: twice the weights give other sums
        _close(out["s"], ref["v"])


@pytest.mark.parametrize("factor", [0.0, 0.3, 0.99, 1.0, 1e-6])
def test_backward_scan_equals_the_torch_sums_to_go(factor):
    """One pass y_t = x_t + f y_{t+1} on the CPU; the power-scaled cumulative sum (or, for a
    factor whose powers underflow, the triangular product) elsewhere: the same to rounding."""
    x = torch.randn(37, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fast, slow = sum_to_go(x, factor), sum_to_go_torch(x, factor)
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=1e-12, atol=1e-12)
    direct = torch.stack([(x[:, t:] * factor ** torch.arange(60 - t, dtype=torch.float64)).sum(1)
                          for t in range(60)], 1)
    np.testing.assert_allclose(fast.numpy(), direct.numpy(), rtol=1e-12, atol=1e-12)


def test_td_errors_compiled_equal_torch_and_the_definition():
    """delta_t = r_t + gamma V[t+1, s_{t+1}] - V[t, s_t], the bootstrap 0 at the last step and
    delta 0 after the end: the compiled pass, the torch code and a plain loop agree."""
    gen = torch.Generator().manual_seed(7)
    N, T, S, gamma = 23, 17, 5, 0.9
    states = torch.randint(0, S, (N, T), generator=gen)
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    lengths[0] = T  # one trajectory reaches the horizon
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randn(N, T, dtype=torch.float64, generator=gen) * mask
    V = torch.randn(T + 1, S, dtype=torch.float64, generator=gen)
    fast = td_errors(rewards, states, lengths, V, gamma)
    slow = td_errors_torch(rewards, states, lengths, V, gamma)
    direct = torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        L = int(lengths[i])
        for t in range(L):
            nxt = float(V[t + 1, states[i, t + 1]]) if t + 1 < L else 0.0
            direct[i, t] = float(rewards[i, t]) + gamma * nxt - float(V[t, states[i, t]])
    torch.testing.assert_close(fast, direct, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(slow, direct, rtol=1e-14, atol=1e-14)
    with pytest.raises(AssertionError):  # must fail: another discount gives other errors
        torch.testing.assert_close(td_errors(rewards, states, lengths, V, 0.5), direct)


def test_float32_arithmetic_moves_no_figure_beyond_rounding():
    """measure's default float32 arithmetic on the CPU against float64 on the same trajectories:
    every estimator's mean and variance agree to 1e-5 relative, while another seed (the
    sampling error that the reported intervals carry) moves them by far more."""
    mdp = make_mdp("FrozenLake-v1")
    policy = make_policy("trained:fraction=0.5", mdp, 0.99, 30)
    sol = solve(mdp, policy, 0.99, 30)
    chosen = estimators.resolve("all")
    run = {(dt, seed): measure(mdp, policy, sol, chosen, 20_000, 10, seed=seed, device="cpu",
                               dtype=dt)
           for dt, seed in [(torch.float32, 0), (torch.float64, 0), (torch.float64, 1)]}
    single, double, other = run[torch.float32, 0], run[torch.float64, 0], run[torch.float64, 1]
    for name in double.means:
        scale = float(np.abs(double.means[name]).max())
        assert float(np.abs(single.means[name] - double.means[name]).max()) <= 1e-5 * scale
        v32, v64 = single.stats[name].sampled.variance, double.stats[name].sampled.variance
        assert v32 == pytest.approx(v64, rel=1e-5)
    moved = [float(np.abs(other.means[n] - double.means[n]).max()) / float(np.abs(double.means[n]).max())
             for n in double.means]
    assert min(moved) > 1e-3  # must-fail scale: sampling noise dwarfs float32 rounding


def test_inverse_cdf_compiled_equals_cumsum_and_searchsorted():
    """The compiled draw: the number of partial sums <= u, exactly as torch's cumsum and
    searchsorted(right=True) count them, ties and rows of mass below 1 included."""
    gen = torch.Generator().manual_seed(9)
    N, T = 500, 37
    q = torch.rand(N, T, dtype=torch.float64, generator=gen)
    q = q / q.sum(1, keepdim=True) * torch.rand(N, 1, dtype=torch.float64, generator=gen)
    q[::7, 20:] = 0.0  # episodes that ended early
    u = torch.rand(N, 1, dtype=torch.float64, generator=gen)
    u[::11] = q.cumsum(1)[::11, 5:6]  # ties with a partial sum: counted, as right=True does
    u[::13] = 0.9999999  # beyond the mass: T
    expected = torch.searchsorted(q.cumsum(1), u, right=True)
    assert torch.equal(inverse_cdf(q, u), expected)
    assert int((expected == T).sum()) > 0 and int((expected < T).sum()) > N // 4
    assert not torch.equal(inverse_cdf(q, u * 0.5), expected)  # must fail: other uniforms
