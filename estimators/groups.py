"""Group estimators of LLM fine-tuning: an advantage per response (or per step) from the group,
and a loss aggregation mode.

The batch of B trajectories is the group (run ``measure --shared-start`` for G responses to one
prompt). An estimator here returns advantages A_it; the aggregation mode turns them into the
framework's batch gradient g = sum_i sum_t A_it psi_it x (the mode's scale), and each member's
weights are scaled so that the batch mean of the members' estimates is exactly g:

    token-sum                 g = (1/B) sum_i sum_t A_it psi_it             member weight A_it
    seq-mean-token-mean       g = (1/B) sum_i (1/L_i) sum_t A_it psi_it     A_it / L_i
    token-mean                g = sum_i sum_t A_it psi_it / sum_j L_j       A_it B / sum_j L_j
    seq-mean-token-sum-norm   g = (1/B) sum_i (1/H) sum_t A_it psi_it       A_it / H

(L_i = realised length, H = the horizon, the length limit). ``NAME`` uses its source's mode,
``NAME:agg=MODE`` another. R_i is the return G_0 of member i (the frameworks' summed outcome
reward when gamma = 1). Like the frameworks, no estimator here weights step t by gamma^t.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, update_wrapper

import torch
from torch import Tensor

from suite.core.errors import InputError, did_you_mean
from suite.core.group_moments import AGG_MODES, GRPO_EPS, NO_EXACT, RULES, WHITEN_EPS, greedy_return

from .context import Context
from .critics import gae_advantages
from .registry import Estimator, register, register_family

__all__ = ["AGG_MODES", "advantage", "aggregated", "aggregation_weight", "per_response", "returns",
           "whiten"]

MODE_NOTES = {
    "seq-mean-token-mean": "each response's sum is divided by its own length L_i, a weight that "
                           "depends on the actions (the length bias: the derivation's step D6, a "
                           "per-step average where the theorem has a sum)",
    "token-mean": "the batch's sum is divided by its total length sum_j L_j, a random divisor "
                  "that includes the member's own length",
    "seq-mean-token-sum-norm": "the sum is divided by the length limit H, a constant: E is "
                               "token-sum's E / H",
}


def aggregation_weight(ctx: Context, mode: str) -> Tensor:
    """The factor [N, 1] that turns member i's advantages into its share of the batch gradient."""
    L = ctx.batch.lengths.to(ctx.dtype)[:, None]
    if mode == "token-sum":
        return torch.ones_like(L)
    if mode == "seq-mean-token-mean":
        return 1.0 / L
    if mode == "token-mean":
        return ctx.batch_size / ctx.batch_sum(L)
    if mode == "seq-mean-token-sum-norm":
        return torch.full_like(L, 1.0 / ctx.batch.horizon)
    raise InputError(f"unknown aggregation mode '{mode}'{did_you_mean(mode, AGG_MODES)} known: "
                     f"{', '.join(AGG_MODES)}")


def aggregated(ctx: Context, adv: Callable[[Context], Tensor], agg: str) -> Tensor:
    """Step weights [N, T] of the advantages adv(ctx) ([N, 1] per response or [N, T] per step)
    under aggregation mode agg."""
    return (adv(ctx) * aggregation_weight(ctx, agg)).expand_as(ctx.batch.rewards)


def _weights(adv: Callable[[Context], Tensor], mode: str | None = None) -> Callable:
    """The registry's function of an advantage estimator: ctx (, agg) -> step weights [N, T],
    documented by the advantage function's own docstring."""
    def weights(ctx: Context, agg: str | None = mode) -> Tensor:
        if agg is None:
            raise TypeError("an advantage estimator's weights need its aggregation mode agg")
        return aggregated(ctx, adv, agg)

    return update_wrapper(weights, adv)


def _claim(mode: str, condition: str, unbiased_with: tuple[str, ...]) -> tuple[bool, str]:
    if mode == "token-sum":
        return "token-sum" in unbiased_with, condition
    reason = condition.split(": ", 1)[-1]
    if mode in unbiased_with:
        return True, f"unbiased with agg={mode}: {reason}"
    suffix = f" (unbiased with agg=token-sum: {reason})" if "token-sum" in unbiased_with else \
        f"; the advantage too: {reason}"
    return False, f"biased: {MODE_NOTES[mode]}{suffix}"


def _constant(value: bool) -> Callable[[float], bool]:
    """A claim that does not depend on gamma."""
    return lambda gamma: value


def _no_exact(name: str) -> str:
    """Why the backward-recursion engine has no form for this advantage estimator."""
    if name in NO_EXACT:
        return NO_EXACT[name]
    if name in RULES:
        return ("a group estimator: its exact moments come from conditioning on the members' "
                "outcomes (suite.core.group_moments), not from the backward recursion")
    return "an advantage function without an outcome-level formula"


def advantage(name: str, *, agg: str, formula: str, reference: str, condition: str,
              unbiased_with: tuple[str, ...] = (), needs_batch: bool = True):
    """Decorator: register an advantage function (Context -> A [N, 1] or [N, T]) as ``name``
    with its source's aggregation mode ``agg``, and the family ``name:agg=MODE``.

    ``condition`` is the claim with agg=token-sum; ``unbiased_with`` the modes under which the
    estimator is unbiased for grad J."""
    no_exact = _no_exact(name)

    def entry(fn, mode: str, spec: str | None = None) -> Estimator | None:
        unbiased, claim = _claim(mode, condition, unbiased_with)
        text = f"{formula}; agg={mode}"
        if spec is None:  # the plain name: registered
            register(name, formula=text, reference=reference, unbiased=unbiased, condition=claim,
                     needs_batch=needs_batch, no_exact=no_exact, agg=mode)(_weights(fn))
            return None
        return Estimator(spec, _weights(fn, mode), text, reference, _constant(unbiased), claim,
                         needs_batch, {"agg": mode}, no_exact=no_exact)

    def family(fn, spec: str, **options) -> Estimator:
        bad = sorted(set(options) - {"agg"})
        if bad:
            raise InputError(f"{name}: unknown option '{bad[0]}'; the only option is "
                             f"agg={'|'.join(AGG_MODES)}")
        mode = str(options["agg"])
        if mode not in AGG_MODES:
            raise InputError(f"{name}: unknown aggregation mode '{mode}'"
                             f"{did_you_mean(mode, AGG_MODES)} known: {', '.join(AGG_MODES)}")
        found = entry(fn, mode, spec)
        assert found is not None  # a spec gives an unregistered entry
        return found

    def deco(fn):
        entry(fn, agg)
        register_family(name, partial(family, fn))
        return fn

    return deco


def returns(ctx: Context) -> Tensor:
    """R_i = G_0, the return of each trajectory, [M, B] (one row per group)."""
    return ctx.reward_to_go[:, 0].reshape(-1, ctx.batch_size)


def per_response(A: Tensor) -> Tensor:
    """[M, B] advantages of the responses -> [N, 1]."""
    return A.reshape(-1, 1)


def whiten(ctx: Context, x: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over all steps of each batch (var with Bessel's correction),
    as verl's masked_whiten and OpenRLHF's global normalisation; x [N, T]."""
    m = ctx.mask
    n = ctx.batch_sum(ctx.batch.lengths.to(x.dtype)[:, None])  # steps of the batch, [N, 1]
    mean = ctx.batch_sum((x * m).sum(1, keepdim=True)) / n
    d = x - mean
    var = ctx.batch_sum((d * m).square_().sum(1, keepdim=True)) / (n - 1)
    return d.div_(torch.sqrt(var + WHITEN_EPS))


@advantage("grpo", agg="seq-mean-token-mean",
           formula="A_i = (R_i - mean_j R_j) / (std_j R_j + 1e-6), sample std",
           condition="biased: the mean includes R_i and the std is a random scale; binary reward, "
                     "one prompt: E = omega_G(p) grad p (the difficulty bias)",
           reference="Shao et al. 2024, 'DeepSeekMath' (GRPO, outcome supervision); verl "
                     "compute_grpo_outcome_advantage")
def grpo(ctx: Context) -> Tensor:
    """A_i = (R_i - mean_j R_j) / (std_j R_j + eps), std with Bessel's correction, eps = 1e-6,
    per response; GRPO's loss is a mean over each response's tokens, then over the group."""
    R = returns(ctx)
    return per_response((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + GRPO_EPS))


@advantage("dr_grpo", agg="seq-mean-token-sum-norm", formula="A_i = R_i - mean_j R_j",
           condition="biased, by the scale only: the mean includes R_i, so E = (1 - 1/G) grad J",
           reference="Liu et al. 2025, 'Understanding R1-Zero-like training: a critical "
                     "perspective' (Dr. GRPO)")
def dr_grpo(ctx: Context) -> Tensor:
    """A_i = R_i - mean_j R_j (GRPO without the std), loss summed over tokens / length limit."""
    R = returns(ctx)
    return per_response(R - R.mean(1, keepdim=True))


@advantage("rloo", agg="token-sum", formula="A_i = R_i - mean_{j != i} R_j",
           condition="unbiased: the baseline is the other members' mean, independent of member "
                     "i given the start (G >= 2)", unbiased_with=("token-sum",),
           reference="Ahmadian et al. 2024, 'Back to basics: revisiting REINFORCE style "
                     "optimization' (RLOO); Kool et al. 2019")
def rloo(ctx: Context) -> Tensor:
    """A_i = R_i - (1/(G-1)) sum_{j != i} R_j, the whole response one action (token-sum).
    leave_one_out_baseline with the full return at every step instead of the reward-to-go."""
    R = returns(ctx)
    B = ctx.batch_size
    return per_response(R - (R.sum(1, keepdim=True) - R) / (B - 1))


@advantage("reinforce_pp", agg="token-mean",
           formula="A_it = whiten(G_t) over all steps of the batch",
           condition="biased at finite batch: the batch mean (own steps included) is subtracted "
                     "and the batch std divides; no gamma^t",
           reference="Hu et al. 2025, 'REINFORCE++' (global advantage normalisation); OpenRLHF, "
                     "verl compute_reinforce_plus_plus_outcome_advantage")
def reinforce_pp(ctx: Context) -> Tensor:
    """A_it = (G_t - m) / sqrt(v + 1e-8), m and v the mean and variance of the reward-to-go over
    every step of the batch (no KL term: there is no reference policy here)."""
    return whiten(ctx, ctx.reward_to_go)


@advantage("reinforce_pp_baseline", agg="token-mean",
           formula="A_it = whiten(R_i - mean_j R_j) over all steps of the batch",
           condition="biased: the group mean includes R_i and the whitening divides by a batch "
                     "statistic",
           reference="Hu et al. 2025, 'REINFORCE++' (REINFORCE++-baseline); verl "
                     "compute_reinforce_plus_plus_baseline_outcome_advantage")
def reinforce_pp_baseline(ctx: Context) -> Tensor:
    """A_i = R_i - mean_j R_j at every step of response i, then whitened over all the batch's
    steps (each response weighs by its length)."""
    R = returns(ctx)
    centred = per_response(R - R.mean(1, keepdim=True)).expand_as(ctx.batch.rewards)
    return whiten(ctx, centred)


@advantage("remax", agg="token-sum", formula="A_i = R_i - R(greedy rollout from s_0^i)",
           condition="unbiased: the baseline depends on the start state only",
           unbiased_with=("token-sum",), needs_batch=False,
           reference="Li et al. 2023, 'ReMax: a simple, effective, and efficient reinforcement "
                     "learning method for aligning large language models'")
def remax(ctx: Context) -> Tensor:
    """A_i = R_i - b(s_0^i), b the return of the greedy policy (argmax pi, first action on ties)
    from the same start: the one greedy rollout's return where transitions are deterministic (the
    token MDP), its expectation over the transitions elsewhere."""
    if ctx.mdp is None:
        raise ValueError("remax needs the MDP for its greedy rollout: build the Context with mdp=")
    key = ("greedy_return", ctx.batch.horizon)
    if key not in ctx.shared:  # one dynamic programme per problem, not per batch
        ctx.shared[key] = greedy_return(ctx.mdp, ctx.exact.pi.cpu(), ctx.gamma, ctx.batch.horizon) \
            .to(ctx.device)
    return (ctx.reward_to_go[:, 0] - ctx.shared[key].index_select(0, ctx.batch.states[:, 0]))[:, None]


@advantage("ppo_advantage_normalization", agg="token-mean",
           formula="A_it = whiten(GAE_t(lambda=0.95, exact critic)) over all steps of the batch",
           condition="biased: standardising over the batch subtracts a batch mean (own steps "
                     "included) and divides by a batch std; no gamma^t",
           reference="Schulman et al. 2017, 'Proximal policy optimization algorithms'; verl "
                     "compute_gae_advantage_return (masked_whiten)")
def ppo_advantage_normalization(ctx: Context) -> Tensor:
    """A_it = GAE(0.95) advantages with the exact critic V_t, standardised over the batch."""
    return whiten(ctx, gae_advantages(ctx, 0.95))


@advantage("opo", agg="token-mean", formula="A_i = R_i - sum_j L_j R_j / sum_j L_j",
           condition="biased: the length-weighted group baseline includes member i's own return "
                     "and length",
           reference="Hao et al. 2025, 'On-policy RL with optimal reward baseline' (OPO); verl "
                     "compute_opo_outcome_advantage")
def opo(ctx: Context) -> Tensor:
    """A_i = R_i - b, b = sum_j L_j R_j / sum_j L_j (the optimal baseline if |grad log p|^2 grows
    like the length)."""
    R = returns(ctx)
    L = ctx.batch.lengths.to(R.dtype).reshape(R.shape)
    return per_response(R - (L * R).sum(1, keepdim=True) / L.sum(1, keepdim=True))
