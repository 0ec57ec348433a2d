"""The statistics engine: sums against direct formulas, and the unbiasedness test's calibration."""

import numpy as np
import pytest
import torch

import estimators
from suite.core.contraction import DenseGrads
from suite.core.exact import solve
from suite.core.policies import random_policy
from suite.core.stats import Moments, block_factors, summarize, unbiasedness_test
from suite.harness.measure import measure

from .conftest import tiny_mdp


def _moments_from_dense(X: torch.Tensor, B: int, chunk: int, g: torch.Tensor) -> Moments:
    M = X.shape[0] // B
    m = Moments(X.shape[1], B, M, block_factors(M, B), torch.device("cpu"))
    for start in range(0, X.shape[0], chunk):
        m.add(DenseGrads(X[start:start + chunk]), start, g)
    return m


def test_summary_matches_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    N, P, B = 1200, 5, 4
    X = torch.randn(N, P, dtype=torch.float64, generator=gen) * torch.arange(1, P + 1) + 0.3
    g = torch.full((P,), 0.25, dtype=torch.float64)
    m = _moments_from_dense(X, B, 400, g)
    row = summarize({"x": m}, g, reference="x")["x"]
    mean = X.mean(0)
    cov = np.cov(X.numpy(), rowvar=False)
    batch_means = X.reshape(-1, B, P).mean(1)
    assert row["variance"] == pytest.approx(np.trace(cov), rel=1e-10)
    assert row["batch_variance"] == pytest.approx(np.trace(np.cov(batch_means.numpy(), rowvar=False)),
                                                  rel=1e-10)
    assert row["rel_bias_plugin"] == pytest.approx(float((mean - g).norm() / g.norm()), rel=1e-10)
    assert row["variance_ratio"] == pytest.approx(1.0)
    lo, hi = row["rel_bias_ci"]
    assert lo <= row["rel_bias"] <= hi
    assert row["n_trajectories"] == N and row["n_batches"] == N // B
    at_b = row["at_batch_size"][B]
    rel_mse = (((batch_means - g) ** 2).sum(1) / (g @ g)).mean()
    assert at_b["rel_mse"] == pytest.approx(float(rel_mse), rel=1e-10)
    # blocks of 4 batches (16 trajectories): each 400-trajectory chunk holds 25 whole blocks
    block_means = X.reshape(-1, 4 * B, P).mean(1)
    at_4b = row["at_batch_size"][4 * B]
    assert at_4b["n_blocks"] == N // (4 * B)
    assert at_4b["rel_mse"] == pytest.approx(float((((block_means - g) ** 2).sum(1) / (g @ g)).mean()),
                                             rel=1e-10)
    cos = (block_means @ g) / (block_means.norm(dim=1) * g.norm())
    assert at_4b["cosine"] == pytest.approx(float(cos.mean()), rel=1e-10)
    assert at_4b["sign_agreement"] == pytest.approx(float((block_means @ g > 0).double().mean()))


def test_zero_variance_coordinates_do_not_break_the_test():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(2000, 4, dtype=torch.float64, generator=gen)
    X[:, 2] = 0.0  # never visited: exactly zero, as is grad J there
    X[:, 3] = 0.7  # deterministic and right
    g = torch.tensor([0.0, 0.0, 0.0, 0.7], dtype=torch.float64)
    m = _moments_from_dense(X, 10, 500, g)
    assert unbiasedness_test(m, g)[1] > 0.01
    X[:, 3] = 0.8  # deterministic and wrong by about the noise of one trajectory
    assert unbiasedness_test(_moments_from_dense(X, 10, 500, g), g)[1] < 0.001


@pytest.mark.slow
def test_unbiasedness_test_false_positive_rate_is_nominal():
    """Over 300 seeds, the level-0.05 test rejects a truly unbiased estimator ~5% of the time.

    Policy with a near-deterministic row, so some coordinates have (almost) zero variance.
    Binomial(300, 0.05): 15 expected; [5, 27] holds with probability > 0.99.
    """
    mdp = tiny_mdp(seed=4, S=3)
    logits = random_policy(3, 2, seed=0).params.reshape(3, 2)
    logits[1] = torch.tensor([40.0, 0.0], dtype=torch.float64)
    from suite.core.policies import tabular

    policy = tabular(logits)
    sol = solve(mdp, policy, 0.9, 4)
    chosen = [estimators.get(n) for n in ("reinforce", "leave_one_out_baseline", "final_formula_rescaled")]
    p_values = {e.name: [] for e in chosen}
    for seed in range(300):
        stats = measure(mdp, policy, sol, chosen, 2000, 10, seed=seed, device="cpu").stats
        for e in chosen:
            p_values[e.name].append(stats[e.name]["p_value"])
    for name, ps in p_values.items():
        rejections = sum(p < 0.05 for p in ps)
        print(f"{name}: {rejections}/300 rejections at level 0.05")
        assert 5 <= rejections <= 27, f"{name}: {rejections}/300 rejections at level 0.05"


def test_biased_estimators_are_flagged_and_unbiased_ones_are_not():
    mdp = tiny_mdp(seed=4, S=3)
    policy = random_policy(3, 2, seed=0)
    sol = solve(mdp, policy, 0.8, 6)
    chosen = estimators.resolve("all")
    stats = measure(mdp, policy, sol, chosen, 200_000, 10, seed=0, device="cpu").stats
    flagged = {name for name, row in stats.items() if row["p_value"] < 1e-3}
    biased = {e.name for e in chosen if not e.claims_unbiased(0.8)}
    # strongly biased ones are caught; no unbiased one reaches p < 1e-3
    assert {"reward_to_go_missing_discount", "final_formula_single_step"} <= flagged
    assert flagged <= biased, f"unbiased estimators flagged: {flagged - biased}"


def test_results_do_not_depend_on_the_other_estimators_chosen():
    """Same seed, same trajectories; a randomised estimator's draws are its own."""
    mdp = tiny_mdp(seed=4, S=3)
    policy = random_policy(3, 2, seed=0)
    sol = solve(mdp, policy, 0.9, 5)
    alone = measure(mdp, policy, sol, estimators.resolve("pgt_state_sampling"), 2000, 10, seed=3,
                    device="cpu").stats["pgt_state_sampling"]
    among = measure(mdp, policy, sol, estimators.resolve("all"), 2000, 10, seed=3,
                    device="cpu").stats["pgt_state_sampling"]
    for key in ("variance", "rel_bias_plugin", "p_value", "variance_ratio"):
        assert alone[key] == among[key], key


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    """Chunks are reduced by any thread in any order; their sums are added in chunk order."""
    import suite.harness.measure as measure_module

    monkeypatch.setattr(measure_module, "default_chunk_size", lambda horizon: 500)
    monkeypatch.setattr(measure_module, "STEPS_PER_PIECE", 1000)
    mdp = tiny_mdp(seed=4, S=3)
    policy = random_policy(3, 2, seed=0)
    sol = solve(mdp, policy, 0.9, 5)
    chosen = estimators.resolve("all")
    before = torch.get_num_threads()
    runs = [measure(mdp, policy, sol, chosen, 4000, 10, seed=5, device="cpu", threads=k)
            for k in (1, 2, 4)]
    assert torch.get_num_threads() == before  # torch's own thread count is restored
    chunk, _ = measure_module._chunk_sizes(4000, 5, 160)
    assert 4000 // chunk >= 4, "the test needs several chunks"
    for other in runs[1:]:
        assert other.stats == runs[0].stats
        for name in runs[0].means:
            np.testing.assert_array_equal(other.means[name], runs[0].means[name])
