"""The report's words: the summary tables as text, the derivation checked step by step against
this study's verdicts, the methodology and the provenance. Plain data (lists of dicts of
strings), shared by the HTML and the PDF renderer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

import pandas as pd

import estimators
from suite.core import stats as S
from suite.harness.stores import mask

from .load import StudyData, summarize

__all__ = ["Step", "condition_rows", "derivation", "estimator_rows", "fmt", "markup", "methodology",
           "provenance", "summary_rows"]

ALPHA = S.ALPHA


def markup(text: str, sup: str = "sup") -> str:
    """Escape ``text`` for HTML or reportlab; inside $...$ spans, x_t, x^t, x_{..} and x^{..}
    become sub- and superscripts (``sup`` is the superscript tag: sup for HTML, super for PDF)."""
    parts = text.split("$")
    out = []
    for i, part in enumerate(parts):
        part = escape(part)
        if i % 2:
            part = re.sub(r"_\{([^}]*)\}|_([A-Za-z0-9*']+)", r"<sub>\1\2</sub>", part)
            part = re.sub(r"\^\{([^}]*)\}|\^([A-Za-z0-9*']+)", rf"<{sup}>\1\2</{sup}>", part)
            part = f"<i>{part}</i>" if sup == "sup" else part
        out.append(part)
    return "".join(out)


def fmt(x: float | None, digits: int = 3) -> str:
    """3 significant digits; 1.2e5 style outside [0.001, 10^4); ∞ and – for inf and missing."""
    if x is None or pd.isna(x):
        return "–"
    x = float(x)
    if math.isinf(x):
        return "∞"
    if x == 0:
        return "0"
    if 10 ** (digits - 1) <= abs(x) < 1e4:
        return f"{x:.0f}"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    mantissa, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _ci(point: float, lo: float, hi: float) -> str:
    return f"{fmt(point)} [{fmt(lo)}, {fmt(hi)}]"


def _range(med: float, lo: float, hi: float) -> str:
    return f"{fmt(med)} ({fmt(lo, 2)}–{fmt(hi, 2)})"


def _claim(r: pd.Series) -> str:
    if r["claims_all"]:
        return "unbiased"
    if not r["claims_any"]:
        return "biased"
    return f"biased in {r['claims_biased']}/{r['n']}"


# ------------------------------------------------------------------------- summary tables
def summary_rows(data: StudyData) -> dict[str, dict]:
    """Per environment: {'n': conditions, 'rows': [cells]} of the summary table."""
    table = summarize(data)
    out = {}
    for env, g in table.groupby("env", sort=True):
        n = int(data.conditions[data.conditions["env"] == env].shape[0])
        rows = []
        for _, r in g.iterrows():
            single = r["n"] == 1
            if single:
                test = (f"rejects (p={fmt(r['p_value'], 2)})" if r["rejects"]
                        else f"does not reject (p={fmt(r['p_value'], 2)})")
                agree = "–" if not r["tested"] else ("yes" if r["agrees"] else "NO")
            else:
                test = f"rejects in {r['rejects']}/{r['tested']}"
                agree = f"{r['agrees']}/{r['tested']}"
            rows.append({
                "estimator": r["estimator"], "claim": _claim(r),
                "rel_bias": (_ci(r["rel_bias_median"], r["rel_bias_lo"], r["rel_bias_hi"]) if single
                             else _range(r["rel_bias_median"], r["rel_bias_min"], r["rel_bias_max"])),
                "test": test, "agrees": agree,
                "agree_flag": bool(r["agrees"] == r["tested"]),
                "var_ratio": (_ci(r["var_ratio_median"], r["var_ratio_lo"], r["var_ratio_hi"])
                              if single else
                              _range(r["var_ratio_median"], r["var_ratio_min"], r["var_ratio_max"])),
                "nts": fmt(r["noise_to_signal"]), "batch": fmt(r["batch_for_mse_0.1"]),
            })
        out[env] = {"n": n, "rows": rows}
    return out


SUMMARY_HEAD = {
    "one": ["estimator", "claim", "rel. bias [95% CI]", "test of mean = ∇J", "agrees with claim",
            "variance / reinforce [95% CI]", "noise / signal", "B for rel. MSE 0.1"],
    "many": ["estimator", "claim", "rel. bias: median (min–max)", "test of mean = ∇J",
             "agrees with claim", "variance / reinforce: median (min–max)", "noise / signal, median",
             "B for rel. MSE 0.1, median"],
}


def condition_rows(data: StudyData) -> dict[str, list[dict]]:
    """Per environment, per condition: {'condition': label, 'run': id, 'rows': [cells]},
    one row per estimator with its intervals."""
    out: dict[str, list[dict]] = {}
    for env, conds in data.conditions.groupby("env", sort=True):
        blocks = []
        for _, c in conds.iterrows():
            g = data.estimators[data.estimators["condition_run"] == c["condition_run"]]
            rows = [{
                "estimator": r["estimator"],
                "claim": "unbiased" if r["claims_unbiased"] else "biased",
                "rel_bias": _ci(r["rel_bias"], r["rel_bias_lo"], r["rel_bias_hi"]),
                "p": fmt(r["p_value"], 2),
                "verdict": "–" if r["rejects"] is None else ("rejects" if r["rejects"] else "—"),
                "agrees": "–" if r["agrees"] is None else ("yes" if r["agrees"] else "NO"),
                "var_ratio": _ci(r["var_ratio"], r["var_ratio_lo"], r["var_ratio_hi"]),
                "nts": fmt(r["noise_to_signal"]), "batch": fmt(r["batch_for_mse_0.1"]),
            } for _, r in g.sort_values("order").iterrows()]
            blocks.append({"condition": f"{c['label']}  (|∇J| = {fmt(c['grad_norm'])}, "
                                        f"J = {fmt(c['J'])})", "rows": rows})
        out[env] = blocks
    return out


CONDITION_HEAD = ["estimator", "claim", "rel. bias [95% CI]", "p-value", "test", "agrees",
                  "variance / reinforce [95% CI]", "noise / signal", "B for MSE 0.1"]


def estimator_rows(data: StudyData) -> list[dict]:
    """Formula, claim in words and reference of each estimator of the study (the registry)."""
    rows = []
    for name in data.estimator_names:
        try:
            e = estimators.get(name)
            rows.append({"name": name, "formula": e.formula, "claim": e.condition,
                         "reference": e.reference})
        except Exception:  # not in the installed registry any more
            rows.append({"name": name, "formula": "–", "claim": "–", "reference": "–"})
    return rows


# ----------------------------------------------------------------------------- derivation
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
         "$a_t$, so $R_t$ may be the discounted return from t, $γ^t G_t$ (reward_to_go). Writing "
         "$R_t = G_t$ without $γ^t$, as often done, drops a factor the theorem needs "
         "(reward_to_go_missing_discount): biased whenever γ < 1.",
         ["reinforce", "reward_to_go", "reward_to_go_missing_discount"]),
    Step("D6", "The 'final formula'", "∇J = E[R_t ψ_t]",
         "The popular final line drops the sum over t. Taken literally, with one time step t "
         "drawn uniformly (final_formula_single_step), its expectation is a 1/H-scaled version of "
         "the missing-discount one when episodes do not end early: biased. Repairs: weight the "
         "drawn step by $T γ^t$ (final_formula_rescaled), or draw t with probability $γ^t / Z$ "
         "(the normalised discounted state distribution of the theorem) and multiply by "
         "$Z = Σ_{t<H} γ^t$ (pgt_state_sampling); both are unbiased.",
         ["final_formula_single_step", "final_formula_rescaled", "pgt_state_sampling"]),
]


def _verdict(g: pd.DataFrame, what: str = "") -> str:
    """'test rejects in 19 of 24 conditions, median relative bias 0.50 (max 0.83)'."""
    n, k = len(g), int(g["rejects"].fillna(False).astype(bool).sum())
    med, top = g["rel_bias"].median(), g["rel_bias"].max()
    where = f" {what}" if what else ""
    return (f"the test rejects 'mean = ∇J' in {k} of {n} conditions{where}, median relative "
            f"bias {fmt(med, 2)} (max {fmt(top, 2)})")


def _finding(data: StudyData, name: str) -> str:
    g = data.estimators[data.estimators["estimator"] == name]
    if g.empty:
        return f"{name}: not run in this study."
    unbiased, biased = g[g["claims_unbiased"]], g[~g["claims_unbiased"]]
    parts = []
    by_gamma = name == "reward_to_go_missing_discount"  # its claim depends on γ
    if len(biased):
        parts.append(f"claimed biased: {_verdict(biased, 'with γ < 1' if by_gamma else '')}")
    if len(unbiased):
        chance = ALPHA * len(unbiased)
        parts.append(f"claimed unbiased: {_verdict(unbiased, 'with γ = 1' if by_gamma else '')}"
                     f"; about {chance:.2g} rejections are expected by chance at level {ALPHA:g}")
    return f"{name}: " + "; ".join(parts) + "."


def _rate(data: StudyData, name: str, claims_unbiased: bool) -> tuple[int, int, float]:
    g = data.estimators[(data.estimators["estimator"] == name)
                        & (data.estimators["claims_unbiased"] == claims_unbiased)]
    return len(g), int(g["rejects"].fillna(False).astype(bool).sum()), float(g["rel_bias"].median())


def derivation(data: StudyData) -> tuple[list[Step], list[str]]:
    """The six steps with this study's findings, and the conclusions in a few sentences."""
    c = data.conditions
    steps = [Step(s.key, s.title, s.formula, s.text, list(s.estimators)) for s in STEPS]
    exact = (f"Checked exactly, not sampled: every condition's J and ∇J come from the exact "
             f"solver (J from {fmt(c['J'].min())} to {fmt(c['J'].max())}, |∇J| from "
             f"{fmt(c['grad_norm'].min())} to {fmt(c['grad_norm'].max())} over {len(c)} "
             "conditions); every estimate below is compared with that ∇J.")
    steps[0].findings.append(exact)
    steps[1].findings.append("An identity: no estimator of its own.")
    steps[2].findings.append("An identity: no estimator of its own; D4 makes it computable.")
    for s in steps[3:]:
        ran = [n for n in s.estimators if (data.estimators["estimator"] == n).any()]
        if not ran:
            s.findings.append(f"This study did not run {', '.join(s.estimators)}.")
            continue
        s.findings.extend(_finding(data, n) for n in s.estimators)
    return steps, _conclusions(data)


def _wrong(k: int, n: int) -> str:
    """How a step's failure shows in k rejections out of n conditions."""
    if 2 * k > n:
        return "goes wrong"
    return "is where the derivation can go wrong, but this study rarely detects it"


def _conclusions(data: StudyData) -> list[str]:
    """Where the derivation goes wrong and how it is repaired, in this study's numbers."""
    out = []
    n, k, med = _rate(data, "reward_to_go_missing_discount", claims_unbiased=False)
    if n:
        out.append(f"D5 without $γ^t$ {_wrong(k, n)}: the test finds reward_to_go_missing_discount "
                   f"biased in {k} of {n} conditions with γ < 1 (median relative bias "
                   f"{fmt(med, 2)}); keeping $γ^t$ gives reward_to_go (below).")
    else:
        out.append("D5 without $γ^t$ (reward_to_go_missing_discount with γ < 1) was not run in "
                   "this study.")
    n, k, med = _rate(data, "final_formula_single_step", claims_unbiased=False)
    if n:
        out.append(f"D6 taken literally {_wrong(k, n)}: the test finds final_formula_single_step "
                   f"biased in {k} of {n} conditions (median relative bias {fmt(med, 2)}).")
    else:
        out.append("D6 taken literally (final_formula_single_step) was not run in this study.")
    repairs = []
    for name in ("reward_to_go", "final_formula_rescaled", "pgt_state_sampling"):
        n, k, med = _rate(data, name, claims_unbiased=True)
        if n:
            repairs.append(f"{name} rejected in {k} of {n} (median relative bias {fmt(med, 2)})")
    if repairs:
        out.append("The unbiased forms, as claimed: " + "; ".join(repairs) + f". At level "
                   f"{ALPHA:g} an unbiased estimator is still rejected in about {ALPHA:.0%} of "
                   "conditions by chance.")
    return out


# ---------------------------------------------------------------------------- methodology
def methodology(data: StudyData) -> list[tuple[str, str]]:
    """(term, explanation) pairs, following suite/stats.py and suite/study.py."""
    c = data.conditions
    seeds = sorted(set(c["seeds"].astype(str)))
    n_seeds = sorted(set(c["n_seeds"]))
    sizes = sorted({(int(n), int(b)) for n, b in zip(c["trajectories"], c["batch_size"], strict=True)})
    size_text = "; ".join(f"N = {n:,} trajectories per seed in M = {n // b:,} batches of B = {b} "
                          f"(K = {S.n_groups(n // b)} groups)" for n, b in sizes)
    return [
        ("Samples", f"Per condition and seed, one rollout of N trajectories from the start "
                    f"distribution, shared by every estimator. This study: seeds {', '.join(seeds)}; "
                    f"{size_text}. The M batches are split into K = min({S.MAX_GROUPS}, M) "
                    "contiguous groups of whole batches; groups are independent, and they are "
                    "what intervals and the test resample."),
        ("Relative bias", "|mean − ∇J| / |∇J|, debiased by the noise floor: the squared distance "
                          "of the mean from the exact ∇J minus its expected value under no bias "
                          "(the batch variance / M), floored at 0, then the square root. The noise "
                          "floor sqrt(batch variance / M) / |∇J| is the relative bias an unbiased "
                          "estimator would show by chance."),
        ("Variance", "Trace of the covariance of one trajectory's estimate (the sum of the "
                     "per-coordinate variances), in squared gradient units."),
        ("Noise-to-signal", "Variance / |∇J|²: how many trajectories it takes for the noise of the "
                            "mean to equal the gradient's size."),
        ("Variance ratio vs reinforce", "Variance of the estimator / variance of reinforce, "
                                        "measured on the same trajectories (paired); below 1 "
                                        "means less noise than reinforce."),
        ("Relative MSE and cosine at batch size B", "The mean $ĝ_B$ of B consecutive "
         "trajectories: $|ĝ_B − ∇J|^2 / |∇J|^2$ and $cos(ĝ_B, ∇J)$, averaged over the rollout's "
         f"disjoint blocks, at B = k × batch size for k in {', '.join(map(str, S.BLOCK_FACTORS))} "
         "(those with at least 8 blocks and at most 65,536 trajectories)."),
        ("Batch size for relative MSE 0.1", "B·batch variance / |∇J|² / (0.1 − relative squared "
         "bias): the number of trajectories whose mean reaches a relative MSE of 0.1; ∞ when the "
         "squared bias alone exceeds 0.1."),
        ("Test of 'mean = ∇J'", "t-test of $H_0$: E[ĝ] = ∇J along u = ∇J/|∇J| over the M "
         "independent batch estimates $y_b = u·ĝ_b$: t = (mean(y) − |∇J|) / (sd(y)/√M), "
         f"two-sided, at level {ALPHA:g}. When the skewness and kurtosis of y predict that its "
         f"level is off by more than {S.LEVEL_TOL:g} (Hall's expansion of the studentised mean), "
         "the test says inconclusive, with the trajectories it would need. For an estimator with "
         "exact moments the verdict is exact, and the test checks the sampling against it."),
        ("Intervals (one seed)", f"95% bootstrap over the K groups ({S.N_BOOT} resamples, the "
         "same for every estimator, so the variance ratio is paired): percentile intervals for "
         "the variance and the variance ratio; for the debiased squared bias a percentile interval "
         "shifted by the bootstrap's own bias (resampling adds the noise once more) and widened to "
         "hold the estimate, whose non-negative part, square-rooted, gives the relative-bias "
         "interval. An interval reaching 0 means the bias is not distinguishable from 0."),
        ("Several seeds", "The seeds' sums are pooled: one set of statistics, one test and one "
         "interval per estimator and condition."
         + (f" This study: {', '.join(map(str, n_seeds))} seed(s) per condition." if n_seeds
            else "")),
        ("Aggregation over conditions", "Where an environment has several conditions, the summary "
         "shows the median over them and the range (min–max) of the point estimates, and counts "
         "verdicts; the per-condition tables give each condition with its intervals."),
    ]


# ----------------------------------------------------------------------------- provenance
def provenance(data: StudyData) -> dict:
    """Invocation runs (versions, device, commit, study hash), condition run ids, study files."""
    inv = data.invocations
    cols = {"run": "run_id", "started": "start", "status": "status", "git commit": "tag:git_commit",
            "study SHA-256": "tag:study_sha256", "device": "tag:device",
            "python": "tag:python_version", "torch": "tag:torch_version",
            "optuna": "tag:optuna_version", "mlflow": "tag:mlflow_version",
            "sampler": "tag:sampler", "Optuna storage": "tag:optuna_storage",
            "workers": "param:workers", "study file": "param:study_file"}
    invocations = []
    for _, r in inv.iterrows():
        row = {}
        for label, col in cols.items():
            v = r.get(col)
            v = mask(v) if label == "Optuna storage" and isinstance(v, str) else v
            row[label] = ("–" if v is None or (isinstance(v, float) and math.isnan(v))
                          else v.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(v, pd.Timestamp)
                          else str(v))
        invocations.append(row)
    conditions = [{"env": r["env"], "condition": r["label"],
                   "trial": "–" if pd.isna(r["trial"]) else str(int(r["trial"])),
                   "run": r["condition_run"], "invocation": r["invocation_run"] or "–"}
                  for _, r in data.conditions.iterrows()]
    skipped = [f"{v} {k}" for k, v in data.skipped.items() if v]
    latest = data.estimators["start"].max()
    return {"uri": data.uri, "experiment": f"{data.name} (id {data.experiment_id})",
            "invocations": invocations, "conditions": conditions, "skipped": skipped,
            "files": [{"sha": sha, "text": text} for sha, text in data.study_files.items()],
            "as_of": latest.strftime("%Y-%m-%d %H:%M UTC") if pd.notna(latest) else "–"}
