"""Critic-based estimators: exact Q and advantage, GAE(lambda) with several critics, all-action."""

from __future__ import annotations

from functools import update_wrapper

import torch

from suite.core.errors import InputError
from suite.core.moments import AllAction, MomentModel, Weighting

from .context import Context
from .registry import Estimator, register, register_family


@register("q_oracle", formula="sum_t gamma^t psi_t Q_t(s_t, a_t)", unbiased=True,
          condition="unbiased: E[G_t | s_t, a_t] = Q_t(s_t, a_t)",
          reference="Sutton et al. 2000, 'Policy gradient methods ... function approximation'",
          exact=lambda m: Weighting(y=m.action(m.sol.Q), beta=0.0, o=m.gamma))
def q_oracle(ctx: Context):
    """w_t = gamma^t Q_t(s_t, a_t) with the exact finite-horizon Q."""
    return ctx.discount * ctx.q_at(ctx.exact.Q)


@register("advantage_oracle", formula="sum_t gamma^t psi_t A_t(s_t, a_t)", unbiased=True,
          condition="unbiased: A_t = Q_t - V_t, a state baseline on q_oracle",
          reference="Sutton et al. 2000; Schulman et al. 2016 (GAE), sec. 2",
          exact=lambda m: Weighting(y=m.action(m.sol.Q), beta=0.0, o=m.gamma,
                                    baseline=m.sol.V[:-1]))
def advantage_oracle(ctx: Context):
    """w_t = gamma^t (Q_t(s_t, a_t) - V_t(s_t))."""
    adv = ctx.q_at(ctx.exact.Q) - ctx.value_at(ctx.exact.V)
    return ctx.discount * adv


@register("all_action", unbiased=True,
          formula="sum_t gamma^t sum_a grad pi(a|s_t) Q_t(s_t, a)",
          condition="unbiased: the expectation over a_t taken exactly (expected policy gradient)",
          reference="Ciosek & Whiteson 2018, 'Expected policy gradients'; Sutton et al. 2000",
          exact=lambda m: AllAction(m.sol.Q))
def all_action(ctx: Context):
    """Integrates the action out at every visited state with the exact Q_t: not a weighting."""
    return ctx.pi_grad_table(ctx.discount[:, None, None] * ctx.exact.Q[: ctx.T])


def critic_table(V: torch.Tensor, critic: str, sigma: float, seed: int) -> torch.Tensor:
    """The critic GAE uses, from the exact V [H+1, S]: V itself; V_t + sigma * max|V| * N(0,1)
    noise fixed by the seed (sigma is relative to the value scale; V_H stays 0); or the
    time-independent V_0(s) at every t < H. A fixed table, so GAE's exact moments exist."""
    if critic == "exact":
        return V
    if critic == "perturbed":
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(V.shape, generator=gen, dtype=V.dtype).to(V.device)
        noise[-1] = 0.0
        return V + sigma * V.abs().max() * noise
    if critic == "timeless":
        out = V[:1].expand_as(V).clone()
        out[-1] = 0.0
        return out
    raise InputError(f"gae: critic must be exact, perturbed or timeless, got '{critic}'")


def gae(ctx: Context, lam: float, critic: str = "exact", sigma: float = 0.0, seed: int = 0):
    """w_t = gamma^t sum_{l>=0} (gamma lambda)^l delta_{t+l},
    delta_t = r_t + gamma V(t+1, s_{t+1}) - V(t, s_t), V = 0 after termination or at the horizon.

    Unbiased with the exact critic for every lambda (E[delta_t | s_t, a_t] = A_t and later deltas
    have mean 0), and for any critic at lambda = 1 (the sum telescopes to G_t - V(t, s_t)).
    """
    return ctx.discount * gae_advantages(ctx, lam, critic, sigma, seed)


def gae_advantages(ctx: Context, lam: float, critic: str = "exact", sigma: float = 0.0,
                   seed: int = 0):
    """The GAE advantages sum_{l>=0} (gamma lambda)^l delta_{t+l} themselves, [N, T] (no gamma^t)."""
    key = ("gae_advantages", lam, critic, sigma, seed)
    if key not in ctx.cache:  # shared by the estimators that use the same GAE
        table = ("critic", critic, sigma, seed)
        if table not in ctx.shared:  # a fixed table: made once per problem
            ctx.shared[table] = critic_table(ctx.exact.V, critic, sigma, seed)
        delta = ctx.td_errors(ctx.shared[table])  # 0 after the end: the sums to go stop there
        ctx.cache[key] = ctx.discounted_sum_to_go(delta, ctx.gamma * lam)
    return ctx.cache[key]


def gae_form(m: MomentModel, lam: float, critic: str = "exact", sigma: float = 0.0,
             seed: int = 0) -> Weighting:
    """GAE as a weighting: y = delta = r + gamma V(t+1, s') - V(t, s), beta = gamma lambda; at
    lambda = 1 the sum telescopes to G_t - V(t, s_t) (V = 0 at the end), the same estimator with
    a reward that does not change with t."""
    V = critic_table(m.sol.V, critic, sigma, seed)
    if lam == 1.0:
        return Weighting(y=m.reward, beta=m.gamma, o=m.gamma, baseline=V[:-1])
    delta = m.reward + m.gamma * m.successor(V) - m.state(V[:-1])
    return Weighting(y=delta, beta=m.gamma * lam, o=m.gamma)


def _gae_claim(lam: float, critic: str) -> tuple[bool, str]:
    if critic == "exact":
        return True, "unbiased for every lambda with the exact critic V_t"
    if lam == 1.0:
        return True, "unbiased: at lambda = 1 the critic is only a baseline"
    return False, f"biased: a {critic} critic with lambda < 1 bootstraps on wrong values"


def _register_gae(name: str, lam: float, critic: str = "exact", sigma: float = 0.0) -> None:
    unbiased, condition = _gae_claim(lam, critic)
    formula = f"sum_t gamma^t psi_t sum_l (gamma lambda)^l delta_(t+l); lambda={lam:g}, " \
              f"critic={critic}" + (f", sigma={sigma:g}" if critic == "perturbed" else "")
    register(name, formula=formula, unbiased=unbiased, condition=condition,
             reference="Schulman et al. 2016, 'High-dimensional continuous control using "
                       "generalized advantage estimation'",
             exact=lambda m: gae_form(m, lam, critic, sigma),
             lam=lam, critic=critic, sigma=sigma)(gae)


_register_gae("gae", 0.95)
for _lam in (0.0, 0.5, 1.0):
    _register_gae(f"gae_lambda_{_lam:g}", _lam)
for _lam in (0.5, 1.0):
    _register_gae(f"gae_perturbed_lambda_{_lam:g}", _lam, "perturbed", 0.5)
_register_gae("gae_timeless_lambda_0.5", 0.5, "timeless")


def gae_entry(spec: str, **kw) -> Estimator:
    """An unregistered GAE variant from ``gae:lambda=L,critic=C[,sigma=X][,seed=K]``."""
    allowed = {"lambda", "critic", "sigma", "seed"}
    bad = sorted(set(kw) - allowed)
    if bad:
        raise InputError(f"gae: unknown option '{bad[0]}'; valid options: {', '.join(sorted(allowed))}")
    lam = kw.get("lambda", 0.95)
    critic = str(kw.get("critic", "exact"))
    sigma = float(kw.get("sigma", 0.5 if critic == "perturbed" else 0.0))
    if not isinstance(lam, int | float) or not 0.0 <= lam <= 1.0:
        raise InputError(f"gae: lambda must lie in [0, 1], got {lam}")
    if critic not in ("exact", "perturbed", "timeless"):
        raise InputError(f"gae: critic must be exact, perturbed or timeless, got '{critic}'")
    unbiased, condition = _gae_claim(float(lam), critic)
    lam, seed = float(lam), int(kw.get("seed", 0))

    def weights(ctx: Context) -> torch.Tensor:
        return gae(ctx, lam, critic, sigma, seed)

    def form(m: MomentModel) -> Weighting:
        return gae_form(m, lam, critic, sigma, seed)

    return Estimator(spec, update_wrapper(weights, gae), f"GAE lambda={lam:g}, critic={critic}",
                     "Schulman et al. 2016", lambda gamma: unbiased, condition, False,
                     {"lam": lam, "critic": critic, "sigma": sigma, "seed": seed}, exact=form)


register_family("gae", gae_entry)
