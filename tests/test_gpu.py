"""The CUDA path against the CPU path and the exact engine (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

import estimators
from suite.core.envs import make_mdp
from suite.core.exact import solve
from suite.core.sampler import ChunkSampler
from suite.core.stats import SUMS
from suite.harness.measure import measure
from suite.harness.problem import make_policy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# estimators that draw nothing of their own, so one trajectory stream gives one result
DETERMINISTIC = ["reinforce", "reward_to_go", "reward_to_go_missing_discount",
                 "batch_mean_baseline", "leave_one_out_baseline", "exact_value_baseline",
                 "fitted_value_baseline", "optimal_constant_baseline", "q_oracle",
                 "advantage_oracle", "all_action", "gae", "gae_lambda_0.5",
                 "gae_perturbed_lambda_0.5", "grpo", "rloo"]


def _problem(env: str):
    mdp = make_mdp(env)
    policy = make_policy("trained:fraction=0.5", mdp, 0.99, 50)
    return mdp, policy, solve(mdp, policy, 0.99, 50)


def test_cuda_sampler_with_the_cpu_stream_draws_the_cpu_trajectories():
    mdp, _, sol = _problem("Taxi-v4")
    cpu = ChunkSampler(mdp, sol.pi, 50, 50_000, seed=4, device="cpu", chunk_size=20_000).chunk(1)
    gpu = ChunkSampler(mdp, sol.pi, 50, 50_000, seed=4, device="cuda", chunk_size=20_000,
                       stream="cpu").chunk(1)
    for field in ("states", "actions", "rewards", "mask", "lengths"):
        assert torch.equal(getattr(cpu, field), getattr(gpu, field).cpu()), field


@pytest.mark.parametrize("env", ["FrozenLake8x8-v1", "Taxi-v4"])
def test_cuda_measure_equals_the_cpu_measure_on_the_same_trajectories(env):
    """Same uniforms, so the same trajectories, and float64 on both: every sum agrees to float64
    rounding (the GPU
    adds in another order, with atomics; the CPU folds with the compiled kernels). 20,000
    trajectories of H 50 make one chunk and one piece on both devices."""
    mdp, policy, sol = _problem(env)
    chosen = estimators.resolve(DETERMINISTIC)
    runs = [measure(mdp, policy, sol, chosen, 20_000, 10, seed=2, device=d, stream="cpu",
                    dtype=torch.float64)  # the CPU's default is float32 arithmetic
            for d in ("cpu", "cuda")]
    for name, m in runs[0].totals.items():
        other = runs[1].totals[name]
        for s in SUMS:
            x, y = getattr(m, s), getattr(other, s)
            scale = float(x.abs().max()) or 1.0
            assert float((x - y).abs().max()) <= 1e-9 * scale, (name, s)


def test_cuda_measure_agrees_with_the_exact_moments():
    """On CUDA's own random stream: the sampled mean of every estimator with exact moments lies
    within 5 standard errors of its exact mean (along the exact engine's direction)."""
    mdp, policy, sol = _problem("FrozenLake8x8-v1")
    result = measure(mdp, policy, sol, estimators.resolve("all"), 200_000, 10, seed=0,
                     device="cuda")
    zs = {name: row.agreement.z for name, row in result.stats.items()
          if row.agreement is not None}
    assert len(zs) >= 15
    assert max(abs(z) for z in zs.values()) < 5, zs
