"""The report's tables, as ``reports.document.Table`` blocks: the first page's overview, the
summary per environment, the results per condition, the estimators, the metric definitions (from
``suite.core.metrics.METRICS``), the calibration counts and the provenance."""

from __future__ import annotations

import math

import pandas as pd

import estimators
from suite.core.metrics import METRICS, by_name
from suite.harness.stores import mask

from .document import Table
from .load import StudyData, column
from .text import breakable, ci, cosine, fmt, span
from .verdicts import Tally

__all__ = ["best_table", "calibration_table", "condition_tables", "estimator_table", "glance_tables",
           "metric_table", "provenance_tables", "summary_tables"]

C = column


def _scale(t_cos: float, t_nr: float) -> str:
    """Short scale-free words for a cell: '×0.90' (right direction) or 'cos 0.998, ×1.8'."""
    if pd.isna(t_cos) or pd.isna(t_nr):
        return ""
    if t_cos >= 1 - 1e-6:
        return f"×{t_nr:.3g}"
    return f"cos {cosine(t_cos)}, ×{t_nr:.3g}"


def _bias_cell(t: Tally) -> str:
    """The first page's bias cell: 'unbiased', or the median exact relative bias of the biased
    conditions with its scale (and in how many it is biased); sampled ones say so."""
    if t.n == 0:
        return "–"
    mark = "" if t.source == "exact" else " (sampled)"
    if t.biased == 0:
        if t.inconclusive:
            need = t.trajectories_needed
            return (f"inconclusive in {t.inconclusive}/{t.n}"
                    + (f" (needs N ≈ {int(need):,})" if pd.notna(need) else "") + mark)
        # a test that does not reject has not shown the estimator unbiased
        return "unbiased" if t.source == "exact" else "not rejected" + mark
    b = t.values("bias", biased_only=True)
    rows = t.measured[t.measured["verdict"] == "biased"]
    scale = _scale(rows["cosine_shown"].median(), rows["norm_ratio_shown"].median())
    cell = f"**{fmt(b.median(), 2)}** {scale}"
    if t.biased < t.n:
        cell += f" (in {t.biased}/{t.n})"
    return cell + mark


def _var_cell(t: Tally) -> str:
    v = t.values("var_ratio")
    if v.empty:
        return "–"
    return fmt(v.median(), 2) + ("" if t.source == "exact" else " (s)")


def _family_rows(tallies: list[Tally], cells, red: set[int]) -> list:
    """Rows with a group heading per family; ``cells(name) -> list`` of one estimator's cells."""
    rows: list = []
    family = None
    for name in dict.fromkeys(t.estimator for t in tallies):
        fam = next(t.family for t in tallies if t.estimator == name)
        if fam != family:
            rows.append(fam)
            family = fam
        if any(t.contradicts for t in tallies if t.estimator == name):
            red.add(len(rows))
        rows.append(cells(name))
    return rows


def glance_tables(tallies: list[Tally], envs: list[str], labels: dict[str, str],
                  per_table: int = 3) -> list[Table]:
    """The first page: estimators by family; per environment the exact relative bias (with its
    scale) and the variance relative to reinforce, medians over the environment's conditions."""
    out = []
    by = {(t.env, t.estimator): t for t in tallies}
    for i in range(0, len(envs), per_table):
        chunk = envs[i:i + per_table]
        red: set[int] = set()

        def cells(name: str, chunk=chunk) -> list:
            first = next(t for t in tallies if t.estimator == name)
            row = [name, first.claim]
            for env in chunk:
                t = by.get((env, name))
                row += [_bias_cell(t), _var_cell(t)] if t else ["–", "–"]
            return row

        head = ["estimator", "claim"]
        for env in chunk:
            head += [f"{breakable(labels.get(env, env))}: bias", "variance / reinforce"]
        rows = _family_rows([t for t in tallies if t.env in chunk], cells, red)
        out.append(Table(head, rows, "mt" + "tn" * len(chunk),
                         [26, 10] + [22 if len(chunk) > 1 else 30, 11] * len(chunk), red))
    return out


def best_table(best: list[dict]) -> Table:
    """Per environment and batch size: the smallest relative MSE, among all estimators and among
    the unbiased ones."""
    def cells(e: dict | None) -> list[str]:
        if e is None:
            return ["–", "–"]
        return [e["estimator"], fmt(e["rel_mse"]) + ("" if e["source"] == "exact" else " (sampled)")
                + (" (biased)" if e["biased"] else "")]

    rows = [[breakable(b["env"]), str(b["B"]), *cells(b["unbiased"]), *cells(b["all"])]
            for b in best]
    return Table(["environment", "B", "smallest relative MSE at B among the unbiased",
                  "relative MSE", "among all estimators", "relative MSE"], rows, "tnmnmn",
                 [24, 6, 24, 14, 24, 14])


def _check_cell(t: Tally) -> str:
    """What sampling says: for exact rows the agreement (largest |z|, sampled / exact variance),
    for sampled-only rows the test after Holm's correction."""
    rows = t.measured
    z = rows[C("agreement_z")].abs().dropna()
    parts = []
    if len(z):
        vr = rows[C("agreement_variance_ratio")].dropna()
        parts.append(f"|z| ≤ {fmt(z.max(), 2)}, variance ×{span(vr, 3)}"
                     if len(vr) else f"|z| ≤ {fmt(z.max(), 2)}")
    sampled = rows[rows["source"] == "sampled"]
    tested = sampled[sampled["holm_rejects"].notna()]
    if len(tested):
        k = int(tested["holm_rejects"].astype(bool).sum())
        p = tested[C("p_value")]
        parts.append(f"rejects in {k}/{len(tested)} (Holm)" if len(tested) > 1 else
                     f"p = {fmt(p.iloc[0], 2)}: {'rejects' if k else 'does not reject'}")
    if len(sampled) > len(tested):
        need = sampled[C("trajectories_needed")].max()
        parts.append(f"inconclusive in {len(sampled) - len(tested)}"
                     + (f", needs N ≈ {int(need):,}" if pd.notna(need) else ""))
    return "; ".join(parts) or "not sampled"


def summary_tables(tallies: list[Tally], envs: list[str]) -> dict[str, Table]:
    """Per environment: every estimator's verdict and numbers (exact when it has exact moments),
    medians over the conditions with their range."""
    out = {}
    for env in envs:
        mine = [t for t in tallies if t.env == env]
        by = {t.estimator: t for t in mine}
        red: set[int] = set()

        def cells(name: str, by=by) -> list:
            t = by[name]
            biased = t.measured[t.measured["verdict"] == "biased"]
            return [name, t.claim, f"{t.verdict}" + ("" if t.source in ("exact", "none")
                                                     else f" ({t.source})"),
                    span(t.values("bias"), 2), span(biased["cosine_shown"], "cos") if len(biased)
                    else span(t.values("cosine_shown"), "cos"),
                    span(biased["norm_ratio_shown"], 3) if len(biased)
                    else span(t.values("norm_ratio_shown"), 3),
                    span(t.values("var_ratio"), 3), span(t.values("rel_mse_shown"), 3),
                    span(t.values("batch_for_0.1"), 3), _check_cell(t)]

        rows = _family_rows(mine, cells, red)
        out[env] = Table(["estimator", "claim", "verdict", "relative bias", "cosine",
                          "norm ratio", "variance / reinforce", "relative MSE at B",
                          "B for relative MSE 0.1", "sampled check"], rows, "mttnnnnnnt",
                         [24, 9, 12, 12, 9, 9, 12, 11, 10, 20], red, small=True)
    return out


def _cond_row(r: pd.Series) -> list:
    exact = r["source"] == "exact"
    if exact:
        bias = fmt(r["bias"])
        var = fmt(r["var_ratio"])
    else:
        bias = ci(r[C("rel_bias")], r[C("rel_bias_ci_low")], r[C("rel_bias_ci_high")])
        var = ci(r[C("variance_ratio")], r[C("variance_ratio_ci_low")],
                 r[C("variance_ratio_ci_high")])
    p = r[C("p_value")]
    test = ("–" if r["trajectories"] == 0 else
            "inconclusive" if pd.isna(p) else f"{fmt(p, 2)}" + (" *" if r[C("rejects_unbiased")] == 1
                                                                  else ""))
    vr = ci(r[C("agreement_variance_ratio")], r[C("agreement_variance_ratio_ci_low")],
            r[C("agreement_variance_ratio_ci_high")])
    word = r["verdict"] if r["verdict"] != "none" else "–"
    return [r["estimator"], "unbiased" if r["claims_unbiased"] else "biased",
            word + ("" if exact or word == "–" else " (s)"), bias, cosine(r["cosine_shown"]),
            fmt(r["norm_ratio_shown"]), var, fmt(r["rel_mse_shown"]), test,
            fmt(r[C("agreement_z")], 2), vr]


CONDITION_HEAD = ["estimator", "claim", "verdict", "relative bias", "cosine", "norm ratio",
                  "variance / reinforce", "relative MSE at B", "test p", "z", "variance sampled / exact"]


def condition_tables(judged: pd.DataFrame, conditions: pd.DataFrame) -> dict[str, Table]:
    """Per environment, one table: a heading row per condition, a row per estimator."""
    out = {}
    for env, conds in conditions.groupby("env", sort=True):
        rows: list = []
        red: set[int] = set()
        for _, c in conds.iterrows():
            g = judged[judged["condition_run"] == c["condition_run"]].sort_values("order")
            blank = int((g["verdict"] == "none").sum())  # no exact moments, nothing sampled
            g = g[g["verdict"] != "none"]
            rows.append(f"{c['label']}  (|∇J| = {fmt(c['grad_norm'])}, J = {fmt(c['J'])}, "
                        + ("exact only" if c["trajectories"] == 0
                           else f"N = {int(c['trajectories']):,}, B = {int(c['batch_size'])}")
                        + (f"; {blank} estimators without exact moments have no numbers here"
                           if blank else "") + ")")
            for _, r in g.iterrows():
                if r["contradicts"]:
                    red.add(len(rows))
                rows.append(_cond_row(r))
        out[env] = Table(CONDITION_HEAD, rows, "mttnnnnnnnn", [22, 8, 9, 13, 7, 7, 13, 8, 7, 5, 13],
                         red, collapsible=f"{env} ({len(conds)} conditions)", small=True)
    return out


def estimator_table(data: StudyData) -> Table:
    """Formula, claim, reference and exact moments of each estimator (the registry's words)."""
    rows, family = [], None
    est = data.estimators
    for name in data.estimator_names:
        fam = est.loc[est["estimator"] == name, "family"].iloc[0]
        if fam != family:
            rows.append(fam)
            family = fam
        mine = est[est["estimator"] == name]
        reasons = list(dict.fromkeys(r for r in mine["no_exact"] if r))
        has = mine[C("exact_rel_bias")].notna().any()
        reasons = [r if len(r) <= 90 else r.split(" (")[0] for r in reasons]
        if not reasons:
            exact = "yes" if has else "no"
        else:
            exact = (("in some conditions; elsewhere " if has else "no: ") + reasons[0]
                     + (f" ({len(reasons) - 1} more reasons in stats.json)" if len(reasons) > 1 else ""))
        try:
            e = estimators.get(name)
            rows.append([name, e.formula, e.condition, exact, e.reference])
        except Exception:  # not in the installed registry (a user's estimator file)
            rows.append([name, "–", "–", exact, "–"])
    return Table(["estimator", "formula", "claim", "exact moments", "reference"], rows, "mmttt",
                 [20, 27, 22, 15, 16], small=True)


# the metrics the report shows, in the order of the methodology
SHOWN = ("exact_rel_bias", "exact_cosine", "exact_norm_ratio", "exact_variance",
         "exact_variance_ratio", "exact_rel_mse", "exact_batch_size_for_rel_mse_0.1",
         "rel_bias", "cosine", "norm_ratio", "variance_ratio", "rel_mse",
         "batch_size_for_rel_mse_0.1", "p_value", "rejects_unbiased", "alpha", "test_inconclusive",
         "trajectories_needed", "agreement_z", "agreement_variance_ratio")


def metric_table(names=SHOWN) -> Table:
    """Name, MLflow key, source and definition of each metric the report shows, from METRICS."""
    rows = []
    for name in names:
        m = by_name(name)
        rows.append([m.name, m.mlflow + ("_at_B" if m.per_batch_size else ""), m.source,
                     m.definition])
    assert len(rows) <= len(METRICS)
    return Table(["metric", "MLflow key", "source", "definition"], rows, "mmtt", [24, 26, 9, 41],
                 small=True)


def calibration_table(cal: pd.DataFrame) -> Table:
    rows: list = []
    setting = None
    for _, r in cal.iterrows():
        key = f"{breakable(r['env'])}, {r['setting']}"
        if key != setting:
            rows.append(key)
            setting = key
        rows.append([r["estimator"], "unbiased" if r["claims_unbiased"] else "biased", r["exact"],
                     f"{r['rejected']} / {r['tested']}",
                     f"{r['rate']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]" if r["tested"] else "–",
                     str(r["inconclusive"])])
    return Table(["estimator", "claim", "exact verdict", "rejected / tested",
                  "rejection rate [95% Clopper-Pearson]", "inconclusive"], rows, "mttnnn",
                 [28, 10, 12, 12, 24, 10])


def provenance_tables(data: StudyData) -> tuple[list[Table], Table, str]:
    """Invocation runs (versions, device, commit, study hash), condition runs, left-out runs."""
    cols = {"run": "run_id", "started": "start", "status": "status", "git commit": "tag:git_commit",
            "study SHA-256": "tag:study_sha256", "device": "tag:device",
            "python": "tag:python_version", "torch": "tag:torch_version",
            "optuna": "tag:optuna_version", "mlflow": "tag:mlflow_version",
            "sampler": "tag:sampler", "Optuna storage": "tag:optuna_storage",
            "workers": "param:workers", "study file": "param:study_file"}
    invocations = []
    for _, r in data.invocations.iterrows():
        rows = []
        for label, col in cols.items():
            v = r.get(col)
            v = mask(v) if label == "Optuna storage" and isinstance(v, str) else v
            rows.append([label, "–" if v is None or (isinstance(v, float) and math.isnan(v))
                         else v.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(v, pd.Timestamp)
                         else str(v)])
        invocations.append(Table(["field", "value"], rows, "tm", [18, 82]))
    conds = Table(["environment", "condition", "trial", "MLflow run", "invocation run"],
                  [[c["env"], c["label"], "–" if pd.isna(c["trial"]) else str(int(c["trial"])),
                    c["condition_run"], c["invocation_run"] or "–"]
                   for _, c in data.conditions.iterrows()], "ttnmm", [18, 26, 6, 25, 25],
                  collapsible=f"{len(data.conditions)} condition runs", small=True)
    skipped = "; ".join(f"{v} {k}" for k, v in data.skipped.items() if v)
    return invocations, conds, skipped

