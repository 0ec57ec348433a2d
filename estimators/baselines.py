"""Reward-to-go with baselines: batch mean, leave-one-out, exact and fitted value, optimal constant."""

from __future__ import annotations

import torch

from suite.core.moments import BatchBaseline, Weighting

from .context import Context
from .registry import register

CROSS_FITTED = ("cross-fitted: fitted on the other half of the batch, a nonlinear function of "
                "those trajectories, so no recursion over (t, s) gives its moments")


@register("batch_mean_baseline", formula="sum_t gamma^t psi_t (G_t - mean_j G_t^j)",
          unbiased=False, needs_batch=True,
          condition="biased: the mean includes the trajectory itself, so E = (B-1)/B grad J",
          reference="Kool, van Hoof & Welling 2019, 'Buy 4 REINFORCE samples, get a baseline "
                    "for free!'",
          exact=lambda m: BatchBaseline(lambda B: 1 - 1 / B, lambda B: 1 / B))
def batch_mean_baseline(ctx: Context):
    """w_t = gamma^t (G_t - (1/B) sum_{j in batch} G_t^j), self included (G_t^j = 0 once j ended)."""
    G = ctx.grouped(ctx.reward_to_go)  # [M, B, T]
    centred = G - G.sum(1, keepdim=True) / ctx.batch_size
    return ctx.discount * centred.view(ctx.reward_to_go.shape)


@register("leave_one_out_baseline", formula="sum_t gamma^t psi_t (G_t - mean_{j != i} G_t^j)",
          unbiased=True, needs_batch=True,
          condition="unbiased: the baseline is independent of the trajectory it is applied to",
          reference="Kool, van Hoof & Welling 2019",
          exact=lambda m: BatchBaseline(lambda B: 1.0, lambda B: 1 / (B - 1)))
def leave_one_out_baseline(ctx: Context):
    """w_t = gamma^t (G_t - (1/(B-1)) sum_{j != i} G_t^j)."""
    G = ctx.grouped(ctx.reward_to_go)  # [M, B, T]
    centred = G - (G.sum(1, keepdim=True) - G) / (ctx.batch_size - 1)
    return ctx.discount * centred.view(ctx.reward_to_go.shape)


@register("exact_value_baseline", formula="sum_t gamma^t psi_t (G_t - V_t(s_t))", unbiased=True,
          condition="unbiased: a baseline that depends on the state only",
          reference="Sutton & Barto 2018, sec. 13.4 (REINFORCE with baseline)",
          exact=lambda m: Weighting(y=m.reward, beta=m.gamma, o=m.gamma, baseline=m.sol.V[:-1]))
def exact_value_baseline(ctx: Context):
    """w_t = gamma^t (G_t - V_t(s_t)) with the exact finite-horizon value V_t."""
    return ctx.discount * (ctx.reward_to_go - ctx.value_at(ctx.exact.V))


@register("fitted_value_baseline", formula="sum_t gamma^t psi_t (G_t - Vhat(s_t)), Vhat from the "
          "other half of the batch", unbiased=True, needs_batch=True,
          condition="unbiased: Vhat is fitted on the other half of the batch (cross-fitting)",
          reference="Chernozhukov et al. 2018 (cross-fitting); Sutton & Barto 2018, sec. 13.4",
          no_exact=CROSS_FITTED)
def fitted_value_baseline(ctx: Context):
    """w_t = gamma^t (G_t - Vhat(s_t)), Vhat(s) = mean of G_t over the visits to s in the other
    half of the batch (0 for states it never visited)."""
    G = ctx.reward_to_go  # 0 after the end: padding adds nothing to the sums
    S = ctx.exact.pi.shape[0]
    key = (ctx.half[:, None] * S + ctx.batch.states).reshape(-1)  # (fold, state) of each entry
    sums = torch.bincount(key, G.reshape(-1), ctx.n_halves * S)
    visits = torch.bincount(key, ctx.mask.reshape(-1), ctx.n_halves * S)
    v_hat = sums / visits.clamp(min=1)  # 0 for states the fold never visited
    baseline = ctx.take(v_hat, ctx.other_half[:, None] * S + ctx.batch.states)
    return ctx.discount * (G - baseline)


@register("optimal_constant_baseline", needs_batch=True, unbiased=True,
          formula="(sum_t psi_tk)(G_0 - b_k), b_k = E[(sum_t psi_tk)^2 G_0] / E[(sum_t psi_tk)^2]",
          condition="unbiased: b is estimated on the other half of the batch (cross-fitting)",
          reference="Greensmith, Bartlett & Baxter 2004, 'Variance reduction techniques for "
                    "gradient estimates in reinforcement learning', Thm. 8",
          no_exact=CROSS_FITTED)
def optimal_constant_baseline(ctx: Context):
    """Per-parameter constant baseline that minimises the variance of REINFORCE, cross-fitted:
    g_ik = R_ik (G_0 - b_k), R_i = sum_t grad log pi(a_t|s_t), b from the other half (0 where the
    other half has no score in coordinate k)."""
    R = ctx.score(ctx.ones)  # sum_t psi_t
    # b_k(h) = sum_{i in h} R_ik^2 G0_i / sum_{i in h} R_ik^2, applied to the other half
    return R.cross_fitted(ctx.reward_to_go[:, 0], ctx.half, ctx.n_halves)
