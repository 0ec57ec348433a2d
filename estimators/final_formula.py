"""The derivation's "final formula" (step D6), taken literally and repaired."""

from __future__ import annotations

import torch

from suite.core.moments import MomentModel, SingleStep

from .context import Context
from .registry import StepDraw, register


def _steps(m: MomentModel, q_time, q_len, c_time, c_len) -> SingleStep:
    """A single-step form on G_t (y = r, beta = gamma); *_len are functions of the length T."""
    L = torch.arange(m.H + 1, dtype=torch.float64).clamp(min=1)  # T >= 1 for every episode
    return SingleStep(m.reward, m.gamma, q_time, q_len(L), c_time, c_len(L))


def _uniform_step(ctx: Context) -> torch.Tensor:
    """q_it = 1 / T_i on the realised steps: t* uniform on 0..T_i-1 (float64: a distribution)."""
    L = ctx.batch.lengths[:, None].to(torch.float64)
    return torch.where(ctx.batch.mask, 1.0 / L, 0.0)


@register("final_formula_single_step", unbiased=False,
          formula="psi_t* G_t*, t* uniform on 0..T-1",
          condition="biased: the sum over time steps is dropped (derivation step D6 taken "
                    "literally); without early termination E = (1/H) x the missing-discount "
                    "expectation",
          reference="the 'final formula' grad J = E[R_t psi_t] as often written",
          exact=lambda m: _steps(m, m.discount(1.0), lambda L: 1 / L, m.discount(1.0),
                                 lambda L: L**0))
def final_formula_single_step(ctx: Context) -> StepDraw:
    """One uniformly drawn step of the trajectory, undiscounted reward-to-go, no rescaling."""
    return StepDraw(_uniform_step(ctx), ctx.reward_to_go)


@register("final_formula_rescaled", unbiased=True,
          formula="T gamma^t* psi_t* G_t*, t* uniform on 0..T-1",
          condition="unbiased: importance weight T = 1/P(t*) restores the sum over t",
          reference="this suite (repair of step D6); see Nota & Thomas 2020",
          exact=lambda m: _steps(m, m.discount(1.0), lambda L: 1 / L, m.discount(m.gamma),
                                 lambda L: L))
def final_formula_rescaled(ctx: Context) -> StepDraw:
    """One uniformly drawn step, weighted by T_i gamma^t* so its mean is reward_to_go's."""
    T = ctx.batch.lengths[:, None].to(ctx.dtype)
    return StepDraw(_uniform_step(ctx), T * ctx.discount * ctx.reward_to_go)


@register("pgt_state_sampling", unbiased=True,
          formula="Z psi_t* G_t* [t* < T], P(t*) = gamma^t* / Z on 0..H-1, Z = sum_{t<H} gamma^t",
          condition="unbiased: s_t* is a draw from the normalised discounted state distribution "
                    "of the theorem's E_{s~d_pi, a~pi}[Q psi] form, and Z restores its scale",
          reference="Sutton et al. 2000 (the theorem's state-distribution form); Thomas 2014, "
                    "'Bias in natural actor-critic algorithms'",
          exact=lambda m: _steps(m, m.discount(m.gamma) / m.discount(m.gamma).sum(),
                                 lambda L: L**0, m.discount(m.gamma).sum().expand(m.H), lambda L: L**0))
def pgt_state_sampling(ctx: Context) -> StepDraw:
    """t* drawn from the discounted distribution over 0..H-1 (steps past the end give 0)."""
    H = ctx.batch.horizon
    t = torch.arange(H, dtype=torch.float64, device=ctx.device)
    disc = torch.tensor(ctx.gamma, dtype=torch.float64, device=ctx.device) ** t
    Z = disc.sum()
    q = torch.where(ctx.batch.mask, disc[: ctx.T] / Z, 0.0)  # float64: a distribution
    return StepDraw(q, Z.to(ctx.dtype) * ctx.reward_to_go)
