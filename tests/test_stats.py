"""The statistics engine: sums against direct formulas, and the unbiasedness test's calibration."""

import numpy as np
import pytest
import torch

import estimators
from suite.core.contraction import DenseGrads
from suite.core.exact import solve
from suite.core.policies import random_policy
from suite.core.stats import Moments, block_factors, scale_test, summarize
from suite.harness.exact_table import exact_rows
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
    row = summarize({"x": m}, g, reference="x")["x"].to_json()
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


def test_zero_variance_directions_give_defined_verdicts():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(2000, 4, dtype=torch.float64, generator=gen)
    X[:, 2] = 0.0  # never visited: exactly zero, as is grad J there
    X[:, 3] = 0.7  # deterministic
    g = torch.tensor([0.0, 0.0, 0.0, 0.7], dtype=torch.float64)  # along coordinate 3 only
    right = scale_test(_moments_from_dense(X, 10, 500, g), g)
    assert right.p_value == 1.0 and right.scale == pytest.approx(1.0)
    X[:, 3] = 0.8  # deterministic and wrong, or rare events not seen: the samples cannot tell
    wrong = scale_test(_moments_from_dense(X, 10, 500, g), g)
    assert wrong.p_value is None and "do not vary" in wrong.inconclusive
    assert wrong.scale == pytest.approx(0.8 / 0.7) and wrong.trajectories_needed == 20_000
    zero = torch.zeros(4, dtype=torch.float64)  # grad J = 0 with noisy estimates: no direction
    undefined = scale_test(_moments_from_dense(X, 10, 500, zero), zero)
    assert undefined.p_value is None and "grad J = 0" in undefined.inconclusive
    silent = scale_test(_moments_from_dense(torch.zeros(2000, 4, dtype=torch.float64), 10, 500,
                                            zero), zero)
    assert silent.p_value == 1.0  # every estimate exactly 0 = grad J


def _bernoulli_moments(p: float, n: int, seed: int, B: int = 10) -> tuple[Moments, torch.Tensor]:
    """One coordinate, X = 1 with probability p (rare events: skewed batch means); g = p."""
    gen = torch.Generator().manual_seed(seed)
    X = (torch.rand(n, 1, generator=gen, dtype=torch.float64) < p).to(torch.float64)
    g = torch.tensor([p], dtype=torch.float64)
    return _moments_from_dense(X, B, n, g), g


def test_scale_test_holds_its_level_and_says_when_it_cannot():
    """Rare events: at 20,000 draws of p = 0.01 (200 events) the t-test's level holds; at 2,000
    draws of p = 0.0005 (about 1 event) it says inconclusive and asks for more. Binomial
    (400, 0.05): 20 expected, [12, 29] holds with probability 0.95; measured: 14/400."""
    rejections = inconclusive = 0
    for seed in range(400):
        test = scale_test(*_bernoulli_moments(0.01, 20_000, seed))
        assert test.p_value is not None
        rejections += test.p_value < 0.05
        inconclusive += scale_test(*_bernoulli_moments(0.0005, 2_000, seed)).p_value is None
    assert 12 <= rejections <= 29
    assert inconclusive == 400
    sparse = scale_test(*_bernoulli_moments(0.0005, 2_000, 0))
    assert sparse.trajectories_needed > 2_000 and "skewed" in sparse.inconclusive


def test_scale_interval_agrees_with_the_test():
    m, g = _bernoulli_moments(0.2, 5_000, 3)
    test = scale_test(m, g)
    lo, hi = test.scale_ci
    assert (lo <= 1.0 <= hi) == (test.p_value >= 0.05)
    shrunk = _moments_from_dense(torch.full((5_000, 1), 0.9, dtype=torch.float64)
                                 + torch.randn(5_000, 1, generator=torch.Generator().manual_seed(0),
                                               dtype=torch.float64), 10, 5_000,
                                 torch.tensor([1.0], dtype=torch.float64))
    biased = scale_test(shrunk, torch.tensor([1.0], dtype=torch.float64))
    assert biased.p_value < 1e-6 and biased.scale_ci[1] < 1.0


@pytest.mark.slow
def test_false_positive_rate_of_the_measured_test():
    """Over 200 seeds of measure (tiny MDP, a near-deterministic policy row, 2,000 trajectories),
    the level-0.05 test rejects truly unbiased estimators about 5% of the time; binomial(200,
    0.05): 10 expected, [3, 19] holds with probability > 0.99."""
    mdp = tiny_mdp(seed=4, S=3)
    logits = random_policy(3, 2, seed=0).params.reshape(3, 2)
    logits[1] = torch.tensor([40.0, 0.0], dtype=torch.float64)
    from suite.core.policies import tabular

    policy = tabular(logits)
    sol = solve(mdp, policy, 0.9, 4)
    chosen = [estimators.get(n) for n in ("reinforce", "leave_one_out_baseline",
                                          "final_formula_rescaled", "fitted_value_baseline")]
    rejections = {e.name: 0 for e in chosen}
    exact = exact_rows(mdp, policy, sol, chosen, 10, (1, 4, 16))  # the same for every seed
    for seed in range(200):
        stats = measure(mdp, policy, sol, chosen, 2000, 10, seed=seed, device="cpu",
                        exact=exact).stats
        for e in chosen:
            rejections[e.name] += bool(stats[e.name].rejects_unbiased)
    for name, k in rejections.items():
        assert 3 <= k <= 19, f"{name}: {k}/200 rejections at level 0.05"


def test_biased_estimators_are_flagged_and_unbiased_ones_are_not():
    mdp = tiny_mdp(seed=4, S=3)
    policy = random_policy(3, 2, seed=0)
    sol = solve(mdp, policy, 0.8, 6)
    chosen = estimators.resolve("all")
    stats = measure(mdp, policy, sol, chosen, 200_000, 10, seed=0, device="cpu").stats
    flagged = {name for name, row in stats.items() if row.sampled.p_value < 1e-3}
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
                    device="cpu").stats["pgt_state_sampling"].to_json()
    among = measure(mdp, policy, sol, estimators.resolve("all"), 2000, 10, seed=3,
                    device="cpu").stats["pgt_state_sampling"].to_json()
    for key in ("variance", "rel_bias_plugin", "p_value", "variance_ratio"):
        assert alone[key] == among[key], key


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    """Chunks are reduced by any thread in any order; their sums are added in chunk order."""
    import suite.harness.measure as measure_module

    monkeypatch.setattr(measure_module, "default_chunk_size", lambda horizon, device=None: 500)
    monkeypatch.setattr(measure_module, "STEPS_PER_PIECE", 1000)
    mdp = tiny_mdp(seed=4, S=3)
    policy = random_policy(3, 2, seed=0)
    sol = solve(mdp, policy, 0.9, 5)
    chosen = estimators.resolve("all")
    before = torch.get_num_threads()
    runs = [measure(mdp, policy, sol, chosen, 4000, 10, seed=5, device="cpu", threads=k)
            for k in (1, 2, 4)]
    assert torch.get_num_threads() == before  # torch's own thread count is restored
    chunk, _ = measure_module.chunk_sizes(4000, 5, 160)
    assert 4000 // chunk >= 4, "the test needs several chunks"
    for other in runs[1:]:
        assert other.stats == runs[0].stats
        for name in runs[0].means:
            np.testing.assert_array_equal(other.means[name], runs[0].means[name])


def test_bootstrap_replicates_from_the_gram_matrix_equal_the_direct_formulas():
    """The replicates' |mean|^2 and mean . g come from the groups' K x K Gram matrix (no
    [R, P] means); the direct formulas on the materialised means give the same statistics."""
    from suite.core.stats import _core_replicates, _totals

    gen = torch.Generator().manual_seed(11)
    K, P, R = 16, 40, 50
    m = Moments(P, 4, 400, [1, 4], torch.device("cpu"))
    m.gsum = torch.randn(K, P, dtype=torch.float64, generator=gen)
    m.gn = torch.full((K,), 100.0, dtype=torch.float64)
    m.gm = torch.full((K,), 25.0, dtype=torch.float64)
    m.gsq = 50.0 + torch.rand(K, dtype=torch.float64, generator=gen)
    m.gbsq = 5.0 + torch.rand(K, dtype=torch.float64, generator=gen)
    g = torch.randn(P, dtype=torch.float64, generator=gen) * 0.01
    w = torch.randint(0, 3, (R, K), generator=gen).to(torch.float64) + 0.5
    N, M, sx, sq, sb = _totals(m, w)
    mean = sx / N[:, None]
    msq = (mean**2).sum(-1)
    direct = {"var": (sq - N * msq) / (N - 1), "var_b": (sb - M * msq) / (M - 1),
              "bias_sq": ((mean - g) ** 2).sum(-1)}
    fast = _core_replicates(m, g, w)
    for key, value in direct.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-10, atol=1e-12)
    other = _core_replicates(m, g, w.flip(0))  # must fail: other replicates, other statistics
    with pytest.raises(AssertionError):
        torch.testing.assert_close(other["var"], direct["var"], rtol=1e-10, atol=1e-12)
