"""Exact moments equal brute-force enumeration of every trajectory (and every batch, for the
estimators that use their batch), for every registered estimator with exact moments.

Parametrised over the registry: a new estimator is covered without anyone remembering.
"""

from __future__ import annotations

import math

import pytest
import torch

import estimators
from estimators import Context, StepDraw
from suite.core.contraction import Contraction
from suite.core.exact import solve
from suite.core.moments import MomentModel, NoExact, exact_moments, project, relative_metrics
from suite.core.policies import mlp, random_policy

from .conftest import tiny_mdp
from .enumerate import all_groups, all_trajectories

# name -> (mdp seed, S, terminating, gamma, H, batch sizes enumerated)
CASES = {
    "terminating": (1, 3, True, 0.8, 3, (2,)),
    "continuing": (2, 2, False, 0.7, 3, (2,)),
    "small": (4, 2, True, 0.9, 2, (2, 3)),
}
SPECS = ["gae:lambda=0.3,critic=perturbed,sigma=0.4,seed=3", "gae:lambda=0.7,critic=timeless"]
NAMES = [*estimators.names(), *SPECS]
_CACHE: dict = {}


def _problem(case: str, kind: str):
    key = (case, kind)
    if key not in _CACHE:
        seed, S, terminating, gamma, H, _ = CASES[case]
        mdp = tiny_mdp(seed=seed, S=S, terminating=terminating)
        policy = random_policy(S, 2, seed=seed) if kind == "tabular" else mlp(S, 2, hidden=3,
                                                                              seed=seed)
        sol = solve(mdp, policy, gamma, H)
        _CACHE[key] = (mdp, policy, sol, all_trajectories(mdp, sol.pi, H))
    return _CACHE[key]


def enumerated(est, case: str, kind: str, B: int, shared: bool = False) -> dict[str, torch.Tensor]:
    """E g, E|g|^2 of one member and E g_B, E|g_B|^2 of the batch, over every B-tuple of
    trajectories (sharing one start when ``shared``) and every draw of the estimator's own step
    t*."""
    mdp, policy, sol, (batch, probs) = _problem(case, kind)
    groups, p = (all_groups(batch, probs, B, mdp.rho0 if shared else None) if B > 1
                 else (batch, probs))
    ctx = Context(groups, sol.gamma, sol, Contraction(policy, torch.device("cpu")).for_batch(groups),
                  max(B, 1), mdp=mdp)
    drawn = est.fn(ctx)
    if isinstance(drawn, StepDraw):  # E over t*: sum_t q_t (estimate with t* = t)
        q, c = drawn
        per_step = []
        for t in range(q.shape[1]):
            w = torch.zeros_like(c)
            w[:, t] = c[:, t]
            per_step.append(ctx.score(w).dense())
        X = torch.stack(per_step, 1)  # [N, T, P]
        mean = (q[:, :, None] * X).sum(1).reshape(-1, B, X.shape[-1])  # E over t*, per member
        second = (q * (X**2).sum(-1)).sum(1).reshape(-1, B)
        # members draw t* independently: E_t*|g_B|^2 = (sum_i E|X_i|^2 + sum_{i!=j} m_i.m_j)/B^2
        in_batch = (second.sum(1) + (mean.sum(1) ** 2).sum(1) - (mean**2).sum((1, 2))) / B**2
        return {"mean": p @ mean[:, 0], "second": p @ second[:, 0],
                "batch_mean": p @ mean.mean(1), "batch_second": p @ in_batch}
    X = est.gradients(ctx).dense()
    members = X.reshape(-1, B, X.shape[1])
    gB = members.mean(1)
    return {"mean": p @ members[:, 0], "second": p @ (members[:, 0] ** 2).sum(1),
            "batch_mean": p @ gB, "batch_second": p @ (gB**2).sum(1)}


def _close(a: torch.Tensor | float, b: torch.Tensor | float, scale: float, tol: float = 1e-10) -> bool:
    return float(torch.as_tensor(a - b).abs().max()) <= tol * scale


@pytest.mark.parametrize("kind", ["tabular", "mlp"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_exact_moments_equal_enumeration(name, case, kind):
    est = estimators.get(name)
    mdp, policy, sol, _ = _problem(case, kind)
    model = MomentModel(mdp, policy, sol)
    form = est.exact_form(model)
    if isinstance(form, NoExact):
        assert form.reason, f"{name} has no exact moments and must say why"
        return
    # iid estimators: the batch formula is checked on the smallest case (every pair, triple)
    for B in (CASES[case][5] if est.needs_batch or case == "small" else (1,)):
        mom = exact_moments(model, form, B)
        ref = enumerated(est, case, kind, B)
        scale = float(ref["second"])
        assert _close(mom.mean, ref["mean"], math.sqrt(scale)), f"{name} B={B}: mean"
        assert _close(mom.second_moment, ref["second"], scale), f"{name} B={B}: E|g|^2"
        assert _close(mom.batch_mean, ref["batch_mean"], math.sqrt(scale)), f"{name} B={B}"
        if ref["batch_second"] is not None:
            assert _close(mom.batch_second_moment, ref["batch_second"], scale), f"{name} B={B}"


def test_every_entry_declares_its_exact_moments_or_why_not():
    model = MomentModel(*_problem("terminating", "tabular")[:3])
    for name in estimators.names():
        form = estimators.get(name).exact_form(model)
        assert not isinstance(form, NoExact) or len(form.reason) > 20, name


def test_iid_batch_moments_follow_from_one_trajectory():
    mdp, policy, sol, _ = _problem("terminating", "tabular")
    model = MomentModel(mdp, policy, sol)
    mom = exact_moments(model, estimators.get("reward_to_go").exact_form(model), 7)
    assert math.isclose(mom.batch_variance, mom.variance / 7, rel_tol=1e-12)
    assert torch.allclose(mom.batch_mean, sol.grad, rtol=1e-10, atol=1e-14)


def test_projection_gives_the_variance_along_a_direction():
    """Var(d . g) from the projected score equals d' Cov d from enumeration, and E[d . g]."""
    mdp, policy, sol, (batch, probs) = _problem("terminating", "tabular")
    model = MomentModel(mdp, policy, sol)
    est = estimators.get("reward_to_go")
    d = torch.randn(policy.n_params, 2, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    proj = MomentModel(mdp, policy, sol, project(model.score, d))
    mom = exact_moments(proj, est.exact_form(proj), 1)
    ctx = Context(batch, sol.gamma, sol, Contraction(policy, torch.device("cpu")).for_batch(batch), 1)
    Xd = est.gradients(ctx).dense() @ d  # [N, 2]
    assert torch.allclose(mom.mean, d @ (probs @ Xd), rtol=1e-10)  # to_params maps back to P
    assert math.isclose(mom.second_moment, float(probs @ (Xd**2).sum(1)), rel_tol=1e-10)


def test_relative_metrics_from_moments():
    mdp, policy, sol, _ = _problem("continuing", "tabular")
    model = MomentModel(mdp, policy, sol)
    bm = exact_moments(model, estimators.get("batch_mean_baseline").exact_form(model), 4)
    row = relative_metrics(bm, sol.grad, block_factors=(1, 4))
    assert math.isclose(row["rel_bias"], 0.25, rel_tol=1e-10)  # E = (1 - 1/4) grad J
    assert math.isclose(row["norm_ratio"], 0.75, rel_tol=1e-10)
    assert math.isclose(row["cosine"], 1.0, rel_tol=1e-12)
    g2 = float(sol.grad @ sol.grad)
    assert math.isclose(row["rel_mse"][16], 0.25**2 + bm.batch_variance / 4 / g2, rel_tol=1e-12)
    assert row["batch_size_for_rel_mse_0.01"] == math.inf  # the bias alone exceeds 0.01
    unbiased = relative_metrics(exact_moments(
        model, estimators.get("reward_to_go").exact_form(model), 4), sol.grad)
    assert unbiased["rel_bias"] < 1e-12


def _union(a, b):
    """The disjoint union of two MDPs (two components; rho0 split evenly)."""
    from suite.core.mdp import MDP

    S1, S2 = a.n_states, b.n_states
    S = S1 + S2

    def block(x, y, fill=0):
        out = torch.full((S, x.shape[1], S), fill, dtype=x.dtype)
        out[:S1, :, :S1], out[S1:, :, S1:] = x, y
        return out

    return MDP(block(a.P, b.P), block(a.R, b.R), block(a.terminated, b.terminated, False),
               torch.cat([a.rho0, b.rho0]) / 2, name="union")


@pytest.mark.parametrize("env", ["FrozenLake-v1", "union"])
def test_fast_paths_equal_the_generic_recursion(env):
    """The tabular fast paths (lag matrices; component-wise rows) against the generic [S, P]
    recursions, for every estimator with exact moments, on an MDP with several components."""
    from suite.core.envs import make_mdp

    mdp = (make_mdp(env) if env != "union"
           else _union(tiny_mdp(seed=1, S=3), tiny_mdp(seed=5, S=4, terminating=False)))
    policy = random_policy(mdp.n_states, mdp.n_actions, seed=7)
    sol = solve(mdp, policy, 0.95, 12)
    fast, generic = MomentModel(mdp, policy, sol), MomentModel(mdp, policy, sol, dense=True)
    assert len(fast.components) == (2 if env == "union" else 1)
    for name in NAMES:
        est = estimators.get(name)
        form = est.exact_form(fast)
        if isinstance(form, NoExact):
            continue
        a, b = exact_moments(fast, form, 3), exact_moments(generic, est.exact_form(generic), 3)
        scale = b.second_moment
        assert _close(a.mean, b.mean, math.sqrt(scale)), name
        assert _close(a.second_moment, b.second_moment, scale), name
        assert _close(a.batch_second_moment, b.batch_second_moment, scale), name


@pytest.mark.parametrize("env", ["FrozenLake-v1", "CliffWalking-v1"])
def test_sampling_agrees_with_the_exact_moments(env):
    """Sampling checks the engine (and the sampler and the estimator code): at 20,000
    trajectories every exact variance lies in the sampled variance's 95% interval and every
    sampled mean is within 4 standard errors of the exact mean along its bias/gradient direction.
    Measured over seeds 0-2 (uniform policy, gamma 0.9, H 20): FrozenLake-v1 0 of 57 intervals
    miss; CliffWalking-v1 2 of 57 (gae_perturbed_lambda_0.5 at ratios 0.992-0.994, which converge
    to 0.998-0.999 at 200,000 trajectories); max |z| 2.13. Seed 0 misses none."""
    from suite.harness.measure import measure
    from suite.harness.problem import make_problem

    problem = make_problem(env, "uniform", 0.9, 20)
    result = measure(problem.mdp, problem.policy, problem.solution, estimators.resolve("all"),
                     20_000, 10, seed=0, device="cpu")
    checked = 0
    for name, row in result.stats.items():
        agree = row.agreement
        assert (agree is not None) == row.exact.exact, name
        if agree is None:
            continue
        lo, hi = agree.variance_ratio_ci
        assert lo <= 1.0 <= hi, f"{name}: sampled/exact variance {agree.variance_ratio:.4f}"
        assert abs(agree.z) < 4, f"{name}: z = {agree.z:.2f}"
        checked += 1
    assert checked >= 17


def test_agreement_catches_a_wrong_exact_mean():
    """The agreement z must fail when the exact side is wrong (here: reward_to_go's exact moments
    paired with the missing-discount estimator's samples)."""
    from suite.harness.exact_table import agreement, exact_rows
    from suite.harness.measure import measure
    from suite.harness.problem import make_problem

    problem = make_problem("CliffWalking-v1", "uniform", 0.9, 20)
    chosen = estimators.resolve("reward_to_go,reward_to_go_missing_discount")
    rows = exact_rows(problem.mdp, problem.policy, problem.solution, chosen, 10)
    result = measure(problem.mdp, problem.policy, problem.solution, chosen, 20_000, 10,
                     device="cpu", exact=rows)
    wrong = agreement(rows["reward_to_go"], result.means["reward_to_go_missing_discount"], 2000,
                      result.stats["reward_to_go_missing_discount"].sampled.variance,
                      result.stats["reward_to_go_missing_discount"].sampled.variance_ci)
    assert wrong is not None and abs(wrong.z) > 10 and wrong.p_value < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_shared_start_moments_equal_enumeration(name):
    """With the batch's trajectories sharing one start state (drawn from rho0), every estimator's
    member and batch moments against enumeration of every such batch of 2 and 3."""
    from suite.harness.exact_table import exact_rows

    est = estimators.get(name)
    mdp, policy, sol, _ = _problem("small", "tabular")
    for B in (2, 3):
        row = exact_rows(mdp, policy, sol, [est], B, directions=False, shared_start=True)[name]
        if row.moments is None:
            assert row.reason
            continue
        ref = enumerated(est, "small", "tabular", B, shared=True)
        mom, scale = row.moments, float(ref["second"])
        assert _close(mom.mean, ref["mean"], math.sqrt(scale)), f"{name} B={B}"
        assert _close(mom.second_moment, ref["second"], scale), f"{name} B={B}"
        assert _close(mom.batch_mean, ref["batch_mean"], math.sqrt(scale)), f"{name} B={B}"
        assert _close(mom.batch_second_moment, ref["batch_second"], scale), f"{name} B={B}"


def test_zero_gradient_gives_defined_exact_metrics():
    """FrozenLake with a horizon too short to reach the goal: grad J = 0 and every estimate 0;
    the relative bias is 0 (defined), the ratios undefined (NaN), nothing crashes."""
    from suite.harness.exact_table import exact_rows
    from suite.harness.problem import make_problem

    problem = make_problem("FrozenLake-v1", "uniform", 0.9, 4)
    assert problem.solution.grad_norm == 0
    rows = exact_rows(problem.mdp, problem.policy, problem.solution,
                      estimators.resolve("reward_to_go,batch_mean_baseline"), 10)
    for row in rows.values():
        assert row.metrics["rel_bias"] == 0.0 and math.isnan(row.metrics["noise_to_signal"])
        assert row.direction is None
