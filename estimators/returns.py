"""Return-weighted estimators: the derivation's steps D4 and D5."""

from __future__ import annotations

from suite.core.moments import Reinforce, Weighting

from .context import Context
from .registry import register


@register("reinforce", formula="sum_t psi_t G_0", unbiased=True,
          condition="unbiased (score-function identity, derivation step D4)",
          reference="Williams 1992, 'Simple statistical gradient-following algorithms'",
          exact=lambda m: Reinforce())
def reinforce(ctx: Context):
    """w_t = G_0, the full discounted return of the trajectory, at every step.

    grad J = E[ G_0 sum_t grad log pi(a_t|s_t) ]  (log-derivative trick; dynamics drop out).
    """
    return ctx.reward_to_go[:, :1].expand_as(ctx.batch.rewards)


@register("reward_to_go", formula="sum_t gamma^t psi_t G_t", unbiased=True,
          condition="unbiased (causality: rewards before t do not depend on a_t)",
          reference="Williams 1992; Sutton & Barto 2018, eq. 13.8",
          exact=lambda m: Weighting(y=m.reward, beta=m.gamma, o=m.gamma))
def reward_to_go(ctx: Context):
    """w_t = gamma^t G_t with G_t = sum_{k>=t} gamma^(k-t) r_k.

    Past rewards are dropped: E[psi_t r_k] = 0 for k < t.
    """
    return ctx.discount * ctx.reward_to_go


@register("reward_to_go_missing_discount", formula="sum_t psi_t G_t",
          unbiased=lambda gamma: gamma == 1.0,
          condition="biased when gamma < 1: drops gamma^t, so late states weigh as much as early "
                    "ones (derivation step D5 read with R_t = G_t); unbiased when gamma = 1",
          reference="Nota & Thomas 2020, 'Is the policy gradient a gradient?'",
          exact=lambda m: Weighting(y=m.reward, beta=m.gamma, o=1.0))
def reward_to_go_missing_discount(ctx: Context):
    """w_t = G_t: what most implementations compute.

    E = sum_t sum_s d_t(s) sum_a grad pi(a|s) Q_t(s, a), the gradient of no objective when gamma<1.
    """
    return ctx.reward_to_go
