"""What the report concludes from the runs: each estimator-condition's verdict (exact where the
estimator has exact moments, else the sampled test, through ``suite.core.metrics.verdict``), the
counts over conditions with Holm's correction, the best estimator at the study's batch size, and
the rejection rates of a per-seed (calibration) study with Clopper-Pearson intervals.

Every number is read from ``StudyData`` columns named by ``suite.core.metrics.METRICS``
(``reports.load.column``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as st

from suite.core.metrics import EXACT_TOL, verdict

from .load import StudyData, column
from .text import cosine

__all__ = ["Tally", "best_estimators", "calibration", "clopper_pearson", "direction", "holm",
           "judge", "levels", "tallies"]

C = column  # short: every metric column goes through the table


def holm(p_values, alpha: float) -> list[bool]:
    """Holm's step-down rejections at family-wise level ``alpha``: the i-th smallest of m
    p-values is rejected while p_(i) <= alpha / (m - i + 1)."""
    p = np.asarray(p_values, dtype=float)
    out = [False] * len(p)
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        if not p[i] <= alpha / (len(p) - rank):
            break
        out[i] = True
    return out


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials."""
    if n == 0:
        return (math.nan, math.nan)
    a = 1 - level
    lo = 0.0 if k == 0 else float(st.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(st.beta.ppf(1 - a / 2, k + 1, n - k))
    return (lo, hi)


def direction(cos: float, norm_ratio: float) -> str:
    """'right direction, scaled by 0.9' or 'cosine 0.998, norm ratio 1.83' (scale-free words)."""
    if pd.isna(cos) or pd.isna(norm_ratio):
        return ""
    if cos >= 1 - 1e-6:
        return "right direction, scaled by " + f"{norm_ratio:.3g}"
    return f"cosine {cosine(cos)}, norm ratio {norm_ratio:.3g}"


def judge(data: StudyData) -> pd.DataFrame:
    """The estimator table with each row's verdict and the numbers it shows:

    * ``verdict`` biased | unbiased | inconclusive | none (no numbers: an exact-only condition
      and no exact moments), ``source`` exact | sampled | none;
    * ``holm_rejects``: the sampled test after Holm's correction over the conditions of the
      same environment in which the estimator was tested (``alpha``: the runs' logged level);
    * ``bias``, ``cosine_shown``, ``norm_ratio_shown``, ``var_ratio``, ``rel_mse_shown``: exact
      when the row has exact moments (an exact relative bias below EXACT_TOL, float64
      round-off, as 0), else sampled;
    * ``contradicts``: claimed unbiased and found biased."""
    est = data.estimators.copy()
    exact = est[C("exact_rel_bias")].where(np.isfinite(est[C("exact_rel_bias")]))
    rejects = est[C("rejects_unbiased")]
    out = [verdict(None if pd.isna(e) else float(e), None if pd.isna(r) else bool(r))
           for e, r in zip(exact, rejects, strict=True)]
    est["verdict"] = [v for v, _ in out]
    est["source"] = [s for _, s in out]
    none = exact.isna() & rejects.isna() & est[C("p_value")].isna() & (est["trajectories"] == 0)
    est.loc[none, ["verdict", "source"]] = ["none", "none"]
    has = exact.notna()
    pick = {"bias": ("exact_rel_bias", "rel_bias"), "cosine_shown": ("exact_cosine", "cosine"),
            "norm_ratio_shown": ("exact_norm_ratio", "norm_ratio"),
            "var_ratio": ("exact_variance_ratio", "variance_ratio"),
            "rel_mse_shown": ("exact_rel_mse", "rel_mse"),
            "batch_for_0.1": ("exact_batch_size_for_rel_mse_0.1", "batch_size_for_rel_mse_0.1")}
    for col, (e, s) in pick.items():
        est[col] = est[C(e)].where(has, est[C(s)])
    est.loc[has & (est["bias"] <= EXACT_TOL), "bias"] = 0.0  # float64 round-off: shown as 0
    est["holm_rejects"] = pd.Series([None] * len(est), dtype=object)
    tested = est[C("p_value")].notna()
    for _, g in est[tested].groupby(["env", "estimator"]):
        alpha = float(g[C("alpha")].dropna().iloc[0]) if g[C("alpha")].notna().any() else 0.05
        for i, r in zip(g.index, holm(g[C("p_value")], alpha), strict=True):
            est.at[i, "holm_rejects"] = r
    sampled = est["source"] == "sampled"
    est.loc[sampled & tested, "verdict"] = [
        "biased" if r else "unbiased" for r in est.loc[sampled & tested, "holm_rejects"]]
    # the claim a reader must not trust: claimed unbiased, found biased (a claimed-biased
    # estimator that is exactly unbiased in a special case shows in its counts instead)
    est["contradicts"] = (est["verdict"] == "biased") & est["claims_unbiased"]
    return est


@dataclass
class Tally:
    """One estimator on one environment, over that environment's conditions."""

    env: str
    estimator: str
    family: str
    order: int
    rows: pd.DataFrame  # the judged rows (every condition of the environment)

    def _n(self, mask) -> int:
        return int(mask.sum())

    @property
    def measured(self) -> pd.DataFrame:
        return self.rows[self.rows["verdict"] != "none"]

    @property
    def source(self) -> str:
        s = set(self.measured["source"])
        return "exact" if s == {"exact"} else "sampled" if s == {"sampled"} else "mixed" if s else "none"

    @property
    def n(self) -> int:
        return len(self.measured)

    @property
    def biased(self) -> int:
        return self._n(self.measured["verdict"] == "biased")

    @property
    def inconclusive(self) -> int:
        return self._n(self.measured["verdict"] == "inconclusive")

    @property
    def claim(self) -> str:
        c = self.rows["claims_unbiased"]
        if c.all():
            return "unbiased"
        if not c.any():
            return "biased"
        return f"biased in {int((~c).sum())}/{len(c)}"

    @property
    def contradicts(self) -> bool:
        return bool(self.rows["contradicts"].any())

    @property
    def verdict(self) -> str:
        """'unbiased' | 'biased' | 'biased in k/n' | 'inconclusive in k/n' | 'not rejected'
        (sampled) (...), '–'."""
        n, k, i = self.n, self.biased, self.inconclusive
        if n == 0:
            return "–"
        parts = []
        if k:
            parts.append("biased" if k == n else f"biased in {k}/{n}")
        if i:
            parts.append(f"inconclusive in {i}/{n}")
        if not parts and self.source == "exact":
            parts.append("unbiased" if n == 1 else f"unbiased in all {n}")
        elif not parts:  # a test that does not reject has not shown the estimator unbiased
            parts.append("not rejected" if n == 1 else f"not rejected in {n}")
        return ", ".join(parts)

    def values(self, col: str, biased_only: bool = False) -> pd.Series:
        rows = self.measured
        if biased_only:
            rows = rows[rows["verdict"] == "biased"]
        return rows[col].astype(float).replace([np.inf, -np.inf], np.nan).dropna() \
            if col != "batch_for_0.1" else rows[col].astype(float).dropna()

    @property
    def trajectories_needed(self) -> float:
        return float(self.measured[C("trajectories_needed")].max())


def tallies(judged: pd.DataFrame) -> list[Tally]:
    """One Tally per environment and estimator, sorted by environment, family, registry order."""
    out = [Tally(env, name, g["family"].iloc[0], int(g["order"].iloc[0]), g)
           for (env, name), g in judged.groupby(["env", "estimator"], sort=False)]
    return sorted(out, key=lambda t: (t.env, t.order))


def best_estimators(judged: pd.DataFrame) -> list[dict]:
    """Per environment and batch size B: the estimator with the smallest median relative MSE at
    B over the conditions it ran in (exact, sampled where there is no exact), among all and among
    those unbiased in every condition there (``unbiased``, None when there is none)."""
    out = []
    rows = judged.dropna(subset=["rel_mse_shown"])
    for (env, b), g in rows.groupby(["env", "batch_size"]):
        medians = g.groupby("estimator")["rel_mse_shown"].median()
        clean = g.groupby("estimator")["verdict"].agg(lambda v: (v == "unbiased").all())
        entry = {"env": env, "B": int(b)}
        for key, pool in (("all", medians), ("unbiased", medians[clean[medians.index]])):
            if pool.empty:
                entry[key] = None
                continue
            top = pool.idxmin()
            mine = g[g["estimator"] == top]
            entry[key] = {"estimator": top, "rel_mse": float(pool[top]),
                          "conditions": int(mine["condition_run"].nunique()),
                          "biased": bool((mine["verdict"] == "biased").any()),
                          "source": "exact" if mine[C("exact_rel_mse")].notna().all() else "sampled"}
        out.append(entry)
    return out


def levels(judged: pd.DataFrame) -> list[float]:
    """The test levels the runs logged (test/alpha), sorted."""
    return sorted(set(judged[C("alpha")].dropna().astype(float)))


def calibration(judged: pd.DataFrame) -> pd.DataFrame:
    """Per setting (a condition without its seed) and estimator: how often the sampled test
    rejected 'mean = grad J' over the seeds (no correction: each seed is one test, the point is
    the rate), its 95% Clopper-Pearson interval, the inconclusive count, and the exact verdict."""
    rows = []
    sampled = judged[judged["trajectories"] > 0]
    for (env, setting, name), g in sampled.groupby(["env", "setting", "estimator"], sort=False):
        tested = g[C("p_value")].notna()
        k = int(g.loc[tested, C("rejects_unbiased")].astype(bool).sum())
        n = int(tested.sum())
        lo, hi = clopper_pearson(k, n)
        exact = g["verdict"].where(g["source"] == "exact").dropna()
        rows.append({"env": env, "setting": setting, "estimator": name,
                     "order": int(g["order"].iloc[0]), "claims_unbiased": bool(g["claims_unbiased"].all()),
                     "rejected": k, "tested": n, "rate": k / n if n else math.nan, "lo": lo, "hi": hi,
                     "inconclusive": int(g[C("test_inconclusive")].fillna(0).astype(bool).sum()),
                     "seeds": len(g),
                     "exact": exact.iloc[0] if len(exact) and exact.nunique() == 1 else "–",
                     "alpha": float(g[C("alpha")].dropna().iloc[0]) if g[C("alpha")].notna().any()
                     else math.nan})
    return pd.DataFrame(rows).sort_values(["env", "setting", "order"]) if rows else pd.DataFrame()
