"""The section "Group estimators" (a study with the group estimators of LLM fine-tuning, on token
MDPs with one prompt each): the exact scale per prompt (the difficulty bias), the length bias of
each loss aggregation, the variance against RLOO, and how the length bias is the derivation's
step D6 again. Every number is an exact metric of the runs (sampled, and marked, where the
estimator has no exact moments)."""

from __future__ import annotations

import pandas as pd

import estimators

from .document import Table
from .figures import difficulty_figure
from .load import StudyData, column
from .text import cosine, fmt, span

__all__ = ["group_section"]

C = column
REFERENCE = "rloo"  # unbiased with agg=token-sum: the group estimators' reference


def _agg(name: str) -> str:
    try:
        return str(estimators.get(name).params.get("agg", ""))
    except Exception:  # a name the installed registry does not know
        return name.partition("agg=")[2]


def _scale(cos: float, nr: float) -> str:
    if pd.isna(cos) or pd.isna(nr):
        return "–"
    return f"×{nr:.3g}" if cos >= 1 - 1e-6 else f"×{nr:.3g}, cos {cosine(cos)}"


def _prompts(data: StudyData) -> list[tuple[str, float]]:
    """(env, pass rate) sorted from easy to hard: with one prompt and a 0/1 verdict, J is the
    prompt's pass rate under the policy."""
    j = data.conditions.groupby("env")["J"].median()
    return sorted(j.items(), key=lambda e: -e[1])


def _difficulty(rows: pd.DataFrame, prompts, bases) -> tuple[Table, str]:
    """Exact scale of E g along ∇J per prompt, rows by group size and estimator."""
    head = ["estimator"] + [f"p = {p:.2f}" for _, p in prompts] + ["largest / smallest"]
    out: list = []
    for g, sub in rows.groupby("batch_size"):
        out.append(f"group size G = {int(g)}")
        for base in bases:
            mine = sub[sub["base"] == base].set_index("env")
            if mine.empty:
                continue
            cells = [_scale(mine["cosine_shown"].get(e), mine["norm_ratio_shown"].get(e))
                     if e in mine.index and mine.loc[e, "source"] == "exact" else "no exact moments"
                     for e, _ in prompts]
            nr = mine.loc[mine["source"] == "exact", "norm_ratio_shown"].dropna()
            spread = fmt(nr.max() / nr.min(), 4) if len(nr) > 1 and nr.min() > 0 else "–"
            out.append([mine["estimator"].iloc[0], *cells, spread])
    table = Table(head, out, "m" + "n" * (len(prompts) + 1), [30] + [18] * len(prompts) + [14])
    gmax = int(rows["batch_size"].max())
    top = rows[rows["batch_size"] == gmax]
    words = []
    for base in bases:
        mine = top[(top["base"] == base) & (top["source"] == "exact")].set_index("env")
        if mine.empty:
            continue
        nr = [mine["norm_ratio_shown"].get(e) for e, _ in prompts if e in mine.index]
        if all(abs(x - 1) < 1e-6 for x in nr):
            words.append(f"`{base}` is unbiased on every prompt")
        elif max(nr) / min(nr) < 1 + 1e-6:
            words.append(f"`{base}` scales every prompt's gradient by the same {fmt(nr[0], 3)}")
        else:
            per = ", ".join(f"{fmt(mine['norm_ratio_shown'].get(e), 3)} at p = {p:.2f}"
                            for e, p in prompts if e in mine.index)
            words.append(f"`{base}` scales it by {per}")
    text = (f"With a 0/1 verdict, a group estimator's exact mean on one prompt is a multiple of "
            f"that prompt's gradient: the table gives the multiple (the norm ratio |E ĝ| / |∇J|, "
            f"with the cosine where the direction changes too) per prompt, p being the prompt's "
            f"pass rate under the policy. With several prompts the mean is the sum of each "
            f"prompt's gradient times its own multiple, so a multiple that depends on p weighs "
            f"easy and hard prompts unlike ∇J does: the difficulty bias. At G = {gmax}: "
            + "; ".join(words) + ".")
    return table, text


def _length(rows: pd.DataFrame, prompts, reference: str) -> tuple[Table, str, dict]:
    """The reference estimator under each aggregation: exact cosine and norm ratio per prompt."""
    ref = rows[rows["base"] == reference]
    head = ["aggregation, G"] + [f"p = {p:.2f}" for _, p in prompts]
    out: list = []
    facts: dict = {}
    for agg, sub in ref.groupby("agg", sort=False):
        out.append(f"agg = {agg}")
        for g, gsub in sub.groupby("batch_size"):
            mine = gsub.set_index("env")
            out.append([f"G = {int(g)}"] + [_scale(mine["cosine_shown"].get(e),
                                                  mine["norm_ratio_shown"].get(e))
                                            for e, _ in prompts])
        exact = sub[sub["source"] == "exact"]
        facts[agg] = {"cos": (exact["cosine_shown"].min(), exact["cosine_shown"].max()),
                      "nr": (exact["norm_ratio_shown"].min(), exact["norm_ratio_shown"].max())}
    table = Table(head, out, "t" + "n" * len(prompts), [20] + [26] * len(prompts))

    def rng(pair, digits=3) -> str:
        lo, hi = pair
        return fmt(lo, digits) if abs(hi - lo) < 1e-9 else f"{fmt(lo, digits)}–{fmt(hi, digits)}"

    parts = []
    for agg, f in facts.items():
        if pd.isna(f["cos"][0]):
            continue
        if f["cos"][0] >= 1 - 1e-6 and abs(f["nr"][0] - 1) < 1e-6 and abs(f["nr"][1] - 1) < 1e-6:
            parts.append(f"{agg} keeps it exactly unbiased")
        elif f["cos"][0] >= 1 - 1e-6:
            parts.append(f"{agg} keeps the direction and scales it by {rng(f['nr'])}")
        else:
            parts.append(f"{agg} turns it (cosine {rng(f['cos'], 4)}) and scales it by "
                         f"{rng(f['nr'])}")
    text = (f"How the per-step losses are summed changes the mean even of an estimator whose "
            f"advantage is unbiased. `{reference}` (unbiased with token-sum) under each "
            f"aggregation, exact, per prompt and group size: " + "; ".join(parts) + ". A "
            "cosine below 1 is the length bias: responses are weighted by a function of their "
            "own length, which the actions decide.")
    return table, text, facts


def _variance(rows: pd.DataFrame, bases, reference: str) -> tuple[Table, str]:
    """Batch variance over the reference's, same prompt, group size and aggregation."""
    exact = rows["source"] == "exact"
    rows = rows.assign(bvar=rows[C("exact_batch_variance")].where(exact, rows[C("batch_variance")]))
    ref = rows[rows["base"] == reference].set_index("condition_run")
    sizes = sorted(rows["batch_size"].unique())
    head = ["estimator"] + [f"G = {int(g)}" for g in sizes]
    out: list = []
    for agg, sub in rows.groupby("agg", sort=False):
        out.append(f"agg = {agg}")
        for base in bases:
            if base == reference:
                continue
            mine = sub[sub["base"] == base]
            if mine.empty:
                continue
            cells = []
            for g in sizes:
                at = mine[mine["batch_size"] == g]
                both = at["condition_run"].map(ref["bvar"])
                ratio = at["bvar"] / both
                sampled = (at["source"] != "exact").any()
                cells.append(span(ratio, 3) + (" (s)" if sampled and len(ratio.dropna()) else ""))
            out.append([mine["estimator"].iloc[0], *cells])
    table = Table(head, out, "m" + "n" * len(sizes), [34] + [16] * len(sizes))
    text = (f"Variance of the group's estimate (the batch of G) over `{reference}`'s, with the "
            "same prompt, group size and aggregation: exact, the median over the prompts with "
            "the range; (s): sampled on the same trajectories, for estimators without exact "
            "moments. Below 1: less noise than the leave-one-out baseline. A scaled estimator's "
            "variance scales with the square of its scale (the difficulty table), so compare at "
            "equal step size.")
    return table, text


def group_section(judged: pd.DataFrame, data: StudyData, figures: bool = True) -> dict | None:
    """Tables, figures and texts of the section, or None when the study has no group estimator
    on a token MDP with a 0/1 verdict."""
    rows = judged[(judged["family"] == "group estimators") & (judged["verdict"] != "none")]
    if rows.empty or not all(str(e).startswith("tokens:") for e in rows["env"].unique()):
        return None
    rows = rows.assign(base=rows["estimator"].str.split(":").str[0],
                       agg=rows["estimator"].map(_agg))
    prompts = _prompts(data)
    bases = list(dict.fromkeys(rows["base"]))
    reference = REFERENCE if REFERENCE in bases else bases[0]
    plain = rows[rows["agg"] == "token-sum"] if (rows["agg"] == "token-sum").any() else rows
    difficulty, difficulty_text = _difficulty(plain, prompts, bases)
    length, length_text, facts = _length(rows, prompts, reference)
    variance, variance_text = _variance(rows, bases, reference)
    smtm = facts.get("seq-mean-token-mean")
    d6 = ("Step D6 replaces the theorem's sum over time steps by a per-step average. "
          "seq-mean-token-mean (GRPO's original loss) does the same inside every response: it "
          "divides the response's sum of advantage-weighted scores by the response's own length "
          "L, so a response's weight depends on how long its actions made it, exactly the move "
          "that made `final_formula_single_step` biased. ")
    if smtm and pd.notna(smtm["cos"][0]):
        d6 += (f"Here it turns even `{reference}`'s exact mean away from ∇J (cosine "
               f"{fmt(smtm['cos'][0], 4)} at worst) and shrinks it (norm ratio "
               f"{fmt(smtm['nr'][0], 3)}–{fmt(smtm['nr'][1], 3)}). ")
    d6 += ("Dividing by a constant instead (seq-mean-token-sum-norm: the length limit H) is the "
           "repair, as $T γ^t$ was for D6: the direction is exact and the scale a constant a "
           "step size absorbs.")
    intro = (f"The group estimators of LLM fine-tuning on {len(prompts)} token "
             f"MDP{'s' if len(prompts) != 1 else ''}, one prompt each: every batch is a group of "
             "G responses to that prompt, and the estimators normalise the members' outcomes "
             "within the group. Exact moments come from conditioning on the members' outcomes "
             "(pass or fail, and length).")
    drawn = {"difficulty": difficulty_figure(plain, prompts)} if figures else {}
    return {"intro": intro, "difficulty_text": difficulty_text, "length_text": length_text,
            "variance_text": variance_text, "d6_text": d6, "figures": drawn,
            "tables": {"difficulty": difficulty, "length": length, "variance_rloo": variance}}
