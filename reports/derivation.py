"""The derivation of the policy-gradient theorem, checked step by step (D1-D6): each step, the
estimators it yields, and what this study's verdicts (exact where the estimator has exact
moments) say about them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from suite.core.metrics import EXACT_TOL

from .load import column
from .text import count, fmt, span
from .verdicts import direction

__all__ = ["STEPS", "Step", "conclusions", "derivation", "finding"]

TOL = f"{EXACT_TOL:.0e}".replace("e-0", "e-")  # '1e-9'



@dataclass
class Step:
    key: str
    title: str
    formula: str
    text: str
    estimators: list[str]  # the estimators the step yields
    findings: list[str] = field(default_factory=list)  # measured in this study


STEPS = [
    Step("D1", "The objective", "J(θ) = E[R] = ∫ P(τ; θ) R(τ) dτ",
         "J is the expected return of a trajectory τ drawn from the policy, with "
         "$R(τ) = Σ_{t<H} γ^t r_t$ truncated at the horizon H.", []),
    Step("D2", "Gradient inside the integral", "∇J(θ) = ∫ R(τ) ∇P(τ; θ) dτ",
         "R(τ) does not depend on θ; on a finite MDP the integral is a finite sum, so the "
         "exchange is exact.", []),
    Step("D3", "Log-derivative trick", "∇J(θ) = E[R(τ) ∇log P(τ; θ)]",
         "∇P = P ∇log P turns the integral back into an expectation that sampled trajectories "
         "can estimate.", []),
    Step("D4", "Score of a trajectory", "∇log P(τ; θ) = Σ_t ∇log π(a_t | s_t)",
         "The dynamics do not depend on θ, so only the policy terms "
         "$ψ_t = ∇log π(a_t | s_t)$ remain: $ĝ = R(τ) Σ_t ψ_t$.", ["reinforce"]),
    Step("D5", "One term per time step", "∇J = Σ_t E[R_t ψ_t]",
         "With $R_t$ the full return R(τ) this is reinforce. Rewards before t do not depend on "
         "$a_t$, so $R_t$ may be the discounted return from t, $γ^t G_t$ (`reward_to_go`). "
         "Writing $R_t = G_t$ without $γ^t$, as often done, drops a factor the theorem needs "
         "(`reward_to_go_missing_discount`): biased whenever γ < 1.",
         ["reinforce", "reward_to_go", "reward_to_go_missing_discount"]),
    Step("D6", "The 'final formula'", "∇J = E[R_t ψ_t]",
         "The popular final line drops the sum over t. Taken literally, with one time step t "
         "drawn uniformly (`final_formula_single_step`), its expectation is a 1/H-scaled version "
         "of the missing-discount one when episodes do not end early: biased. Repairs: weight "
         "the drawn step by $T γ^t$ (`final_formula_rescaled`), or draw t with probability "
         "$γ^t / Z$ (the normalised discounted state distribution of the theorem) and multiply "
         "by $Z = Σ_{t<H} γ^t$ (`pgt_state_sampling`); both are unbiased.",
         ["final_formula_single_step", "final_formula_rescaled", "pgt_state_sampling"]),
]


def _part(rows: pd.DataFrame) -> str:
    """'exact: biased in all 10 (relative bias 0.31 (0.08–0.83); cosine 0.998, norm ratio 1.8)'."""
    rows = rows[rows["verdict"] != "none"]
    if rows.empty:
        return "no numbers (no exact moments and not sampled)"
    out = []
    exact = rows[rows["source"] == "exact"]
    if len(exact):
        k = int((exact["verdict"] == "biased").sum())
        text = f"exact: biased in {count(k, len(exact))}" if k else \
            f"exact: unbiased in {count(len(exact), len(exact))} (relative bias below {TOL})"
        if k:
            biased = exact[exact["verdict"] == "biased"]
            text += (f" (relative bias {span(biased['bias'], 2)}; "
                     f"{direction(biased['cosine_shown'].median(), biased['norm_ratio_shown'].median())}"
                     f"{', medians' if len(biased) > 1 else ''})")
        out.append(text)
    sampled = rows[rows["source"] == "sampled"]
    if len(sampled):
        tested = sampled[sampled["holm_rejects"].notna()]
        k = int(tested["holm_rejects"].astype(bool).sum())
        text = (f"sampled test (Holm): rejects 'mean = ∇J' in {count(k, len(tested))}"
                f" (relative bias {span(sampled['bias'], 2)})")
        if len(sampled) > len(tested):
            text += f", inconclusive in {len(sampled) - len(tested)}"
        out.append(text)
    return "; ".join(out)


def finding(judged: pd.DataFrame, name: str) -> str:
    """One estimator's verdicts over the study's conditions, split by its claim."""
    g = judged[judged["estimator"] == name]
    if g.empty:
        return f"`{name}`: not run in this study."
    by_gamma = name == "reward_to_go_missing_discount"  # its claim depends on γ
    parts = []
    for claim, rows in ((False, g[~g["claims_unbiased"]]), (True, g[g["claims_unbiased"]])):
        if rows.empty:
            continue
        where = (" (γ < 1)" if not claim else " (γ = 1)") if by_gamma else ""
        parts.append(f"claimed {'unbiased' if claim else 'biased'}{where}, {len(rows)} "
                     f"condition{'s' if len(rows) != 1 else ''}: {_part(rows)}")
    return f"`{name}`: " + "; ".join(parts) + "."


def _agreement(rows: pd.DataFrame) -> str:
    z = rows[column("agreement_z")].abs().dropna()
    if z.empty:
        return ""
    return (f"; where sampled, the sampled mean lies within {fmt(z.max(), 2)} standard errors "
            f"of the exact one ({len(z)} estimator-conditions)")


def conclusions(judged: pd.DataFrame) -> list[str]:
    """Where the derivation goes wrong and how it is repaired, in this study's exact numbers."""
    out = []
    wrong = (("D5 without $γ^t$", "reward_to_go_missing_discount", " with γ < 1",
              "; keeping $γ^t$ gives `reward_to_go`"),
             ("D6 taken literally", "final_formula_single_step", "", ""))
    for step, name, where, repair in wrong:
        g = judged[(judged["estimator"] == name) & (judged["source"] == "exact")
                   & ~judged["claims_unbiased"]]
        if g.empty:
            out.append(f"{step} (`{name}`{where}) has no exact verdict in this study.")
            continue
        k = int((g["verdict"] == "biased").sum())
        out.append(f"{step} {'goes wrong' if k else 'does no harm here'}: by its exact moments "
                   f"`{name}` is biased in {count(k, len(g))} conditions{where} (relative bias "
                   f"{span(g['bias'], 2)}; "
                   f"{direction(g['cosine_shown'].median(), g['norm_ratio_shown'].median())})"
                   f"{repair}.")
    repairs = []
    for name in ("reward_to_go", "final_formula_rescaled", "pgt_state_sampling"):
        g = judged[(judged["estimator"] == name) & (judged["source"] == "exact")]
        if len(g):
            k = int((g["verdict"] == "unbiased").sum())
            top = g[column("exact_rel_bias")].replace([np.inf], np.nan).max()
            repairs.append(f"`{name}` is exactly unbiased in {count(k, len(g))} conditions "
                           f"(largest exact relative bias {fmt(top, 2)}{_agreement(g)})")
    if repairs:
        out.append("The repaired forms: " + "; ".join(repairs) + ".")
    return out


def derivation(judged: pd.DataFrame, conditions: pd.DataFrame) -> list[Step]:
    """The six steps with this study's findings."""
    c = conditions
    steps = [Step(s.key, s.title, s.formula, s.text, list(s.estimators)) for s in STEPS]
    steps[0].findings.append(
        f"Exact, not sampled: every condition's J and ∇J come from the exact solver (J from "
        f"{fmt(c['J'].min())} to {fmt(c['J'].max())}, |∇J| from {fmt(c['grad_norm'].min())} to "
        f"{fmt(c['grad_norm'].max())} over {len(c)} conditions); every estimator below is "
        "compared with that ∇J.")
    steps[1].findings.append("An identity: no estimator of its own.")
    steps[2].findings.append("An identity: no estimator of its own; D4 makes it computable.")
    for s in steps[3:]:
        ran = [n for n in s.estimators if (judged["estimator"] == n).any()]
        if not ran:
            s.findings.append(f"This study did not run {', '.join(f'`{n}`' for n in s.estimators)}.")
            continue
        s.findings.extend(finding(judged, n) for n in s.estimators)
    return steps
