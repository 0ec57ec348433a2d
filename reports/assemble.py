"""Everything a report shows, assembled from a study's MLflow records (``reports.load``): the
numbers and tables go into the prose template (``templates/report.md.j2``), whose rendered text
becomes the one block list both renderers walk (``reports.document``)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from .derivation import TOL, conclusions, derivation
from .document import Block, parse
from .figures import make_figures
from .groups import group_section
from .load import StudyData, column
from .tables import (
    best_table,
    calibration_table,
    condition_tables,
    estimator_table,
    glance_tables,
    metric_table,
    provenance_tables,
    summary_tables,
)
from .text import count, fmt, plural, span
from .verdicts import best_estimators, calibration, judge, levels, tallies

__all__ = ["Report", "assemble"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
C = column


@dataclass
class Report:
    """A report: its title and the blocks both renderers walk."""

    name: str
    title: str
    blocks: list[Block]
    uri: str
    as_of: str


def _description(files: dict[str, str]) -> str:
    for text in files.values():
        try:
            return str(tomllib.loads(text).get("study", {}).get("description", ""))
        except tomllib.TOMLDecodeError:
            continue
    return ""


def _names(names: list[str], limit: int = 6) -> str:
    shown = [f"`{n}`" for n in names[:limit]]
    if len(names) > limit:
        shown.append(f"{len(names) - limit} more")
    return ", ".join(shown[:-1]) + (" and " if len(shown) > 1 else "") + shown[-1] if shown else ""


def _findings(judged: pd.DataFrame, best: list[dict]) -> dict:
    """The numbers behind the first page's three sentences (bias, variance, sampling)."""
    exact = judged[judged["source"] == "exact"]
    biased = []
    for name, g in exact[exact["verdict"] == "biased"].groupby("estimator", sort=False):
        b = g[g["verdict"] == "biased"]
        biased.append({"name": name, "max": float(b["bias"].max()),
                       "cos": float(b["cosine_shown"].min()),
                       "scale": float(b["norm_ratio_shown"].median())})
    top = max(biased, key=lambda b: b["max"]) if biased else None
    rescale = sorted((b for b in biased if b["cos"] >= 1 - 1e-6), key=lambda b: -b["max"])
    turned = sorted((b for b in biased if b["cos"] < 1 - 1e-6), key=lambda b: b["cos"])
    claimed = exact[exact["claims_unbiased"]]
    wrong = sorted(set(claimed.loc[claimed["verdict"] == "biased", "estimator"]))
    # variance: medians over every exact condition of the estimators exactly unbiased everywhere
    unbiased = [n for n, g in exact.groupby("estimator") if (g["verdict"] == "unbiased").all()
                and n != "reinforce"]
    ratios = exact[exact["estimator"].isin(unbiased)].groupby("estimator")["var_ratio"].median()
    ratios = ratios.replace([np.inf], np.nan).dropna()
    var = ({"low": ratios.idxmin(), "low_ratio": fmt(ratios.min(), 2),
            "high": ratios.idxmax(), "high_ratio": fmt(ratios.max(), 2), "n": len(ratios)}
           if len(ratios) >= 2 else None)
    sizes = sorted({b["B"] for b in best})
    picks = [b for b in best if b["unbiased"]]
    wins = pd.Series([b["unbiased"]["estimator"] for b in picks]).value_counts() \
        if picks else pd.Series(dtype=int)
    best_text = ""
    if len(wins):
        b_text = f"B = {sizes[0]}" if len(sizes) == 1 else "each batch size B"
        lead = (f"at {b_text} the smallest relative MSE among the unbiased estimators (median over "
                "the conditions) is ")
        if len(sizes) == 1 and len(wins) <= 3:
            per = {w: [f"{b['env']} ({fmt(b['unbiased']['rel_mse'], 2)})" for b in picks
                       if b["unbiased"]["estimator"] == w] for w in wins.index}
            best_text = lead + "; ".join(f"`{w}`'s on {', '.join(e)}" for w, e in per.items())
        else:
            pairs = "environments" if len(sizes) == 1 else "(environment, batch size) pairs"
            best_text = (lead + f"most often `{wins.index[0]}`'s ({wins.iloc[0]} of {len(picks)} "
                         f"{pairs}; the table below)")
    sampled = judged.dropna(subset=[C("agreement_z")])
    z = sampled[C("agreement_z")].abs()
    vr = sampled[C("agreement_variance_ratio")].dropna()
    only = judged[judged["source"] == "sampled"]
    sampled_groups = []
    for claim, g in ((True, only[only["claims_unbiased"]]), (False, only[~only["claims_unbiased"]])):
        if g.empty:
            continue
        tested = g[g["holm_rejects"].notna()]
        names = list(dict.fromkeys(g.sort_values("order")["estimator"]))
        sampled_groups.append({"claim": "unbiased" if claim else "biased", "n": len(names),
                               "names": _names(names, 3), "tests": len(tested),
                               "rejects": int(tested["holm_rejects"].astype(bool).sum()),
                               "inconclusive": int((g["verdict"] == "inconclusive").sum())})
    return {
        "n_estimators": judged["estimator"].nunique(), "n_biased": len(biased),
        "top": top and {"name": top["name"], "max": fmt(top["max"], 2)},
        "rescale": [{"name": b["name"], "scale": fmt(b["scale"], 3)} for b in rescale[:2]],
        "n_rescale": len(rescale), "n_turned": len(turned),
        "turned": turned and {"name": turned[0]["name"], "cos": fmt(turned[0]["cos"], 3)},
        "n_claimed": claimed["estimator"].nunique(), "wrong": _names(wrong, 3),
        "var": var, "best": best_text,
        "agree": {"n": len(sampled), "z": fmt(z.max(), 2) if len(z) else "–",
                  "within": int((z < 1.96).sum()),
                  "vr": f"{fmt(vr.min(), 3)}–{fmt(vr.max(), 3)}" if len(vr) else "–"},
        "sampled": sampled_groups,
    }


def _methodology(data: StudyData, judged: pd.DataFrame) -> dict:
    """The sizes, seeds and the test's constants as the runs logged them."""
    c = data.conditions
    sampled = c[c["trajectories"] > 0]
    sizes = sorted({(int(n), int(b)) for n, b in zip(sampled["trajectories"], sampled["batch_size"],
                                                     strict=True)})
    methods = sorted(set(judged["test_method"]) - {""})
    alphas = levels(judged)
    return {
        "sizes": [{"N": f"{n:,}", "B": b, "M": f"{n // b:,}"} for n, b in sizes],
        "seeds": sorted({str(s).strip("[]") for s in c["seeds"]}), "n_seeds": sorted(set(c["n_seeds"])),
        "exact_only": int((c["trajectories"] == 0).sum()), "sampled": len(sampled),
        "alphas": [f"{a:g}" for a in alphas], "alpha": f"{alphas[0]:g}" if alphas else "–",
        "methods": methods,
        "level_error": fmt(judged[C("test_level_error")].abs().max(), 2),
        "inconclusive": int(judged[C("test_inconclusive")].fillna(0).astype(bool).sum()),
    }


def _overview(data: StudyData) -> str:
    c = data.conditions
    varying = [k.removeprefix("free:") for k in data.varying]
    exact_only = int((c["trajectories"] == 0).sum())
    return (f"{plural(len(c), 'condition')} on {plural(len(data.envs), 'environment')} "
            f"({exact_only} exact only, {len(c) - exact_only} sampled), "
            f"{len(data.estimator_names)} estimators, sampler {data.sampler}; varied: "
            f"{', '.join(varying) or 'nothing'}.")


def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = fmt
    env.filters["span"] = span
    env.filters["capitalize_first"] = lambda text: str(text)[:1].upper() + str(text)[1:]
    env.globals.update(count=count, plural=plural)
    return env.get_template("report.md.j2")


def assemble(data: StudyData, figures: bool = True) -> Report:
    """Verdicts, tables, derivation, figures, methodology and provenance of one study's runs,
    as the block list of the report (``figures=False``: the text and tables only, fast)."""
    judged = judge(data)
    tl = tallies(judged)
    envs = data.envs
    best = best_estimators(judged)
    tables = {f"glance{i}": t for i, t in enumerate(glance_tables(tl, envs, data.env_labels))}
    tables["best"] = best_table(best)
    tables.update({f"summary:{e}": t for e, t in summary_tables(tl, envs).items()})
    tables.update({f"conditions:{e}": t for e, t in condition_tables(judged, data.conditions).items()})
    tables["estimators"] = estimator_table(data)
    tables["metrics"] = metric_table()
    invocations, conds, skipped = provenance_tables(data)
    tables.update({f"invocation{i}": t for i, t in enumerate(invocations)})
    tables["condition_runs"] = conds
    cal = calibration(judged) if data.per_seed else pd.DataFrame()
    if not cal.empty:
        tables["calibration"] = calibration_table(cal)
    groups = group_section(judged, data, figures)
    if groups:
        tables.update(groups["tables"])
    drawn = make_figures(judged, data) if figures else {}
    drawn.update(groups["figures"] if groups else {})
    texts = {f"study{i}": text for i, text in enumerate(data.study_files.values())}
    latest = data.estimators["start"].max()
    as_of = latest.strftime("%Y-%m-%d %H:%M UTC") if pd.notna(latest) else "–"
    context = {
        "name": data.name, "description": _description(data.study_files), "tol": TOL,
        "overview": _overview(data), "envs": envs,
        "glance": [k for k in tables if k.startswith("glance")],
        "findings": _findings(judged, best),
        "several": bool(data.conditions.groupby("env").size().max() > 1),
        "steps": derivation(judged, data.conditions), "conclusions": conclusions(judged),
        "figures": drawn, "groups": groups, "calibration": _calibration_summary(cal),
        "method": _methodology(data, judged), "per_seed": data.per_seed,
        "invocations": [k for k in tables if k.startswith("invocation")], "skipped": skipped,
        "texts": list(texts), "files": data.study_files, "uri": data.uri,
        "experiment": f"{data.name} (id {data.experiment_id})", "as_of": as_of,
    }
    text = _template().render(**context)
    blocks = parse(text, tables, drawn, texts)
    return Report(data.name, f"Study “{data.name}”: bias and variance of policy-gradient estimators",
                  blocks, data.uri, as_of)


def _calibration_summary(cal: pd.DataFrame) -> list[dict[str, str | int]]:
    """Per setting: false-positive rate over the claimed-unbiased estimators, power over the
    claimed-biased ones (pooled counts)."""
    out: list[dict[str, str | int]] = []
    if cal.empty:
        return out
    for (env, setting), g in cal.groupby(["env", "setting"], sort=False):
        fp = g[g["claims_unbiased"]]
        pw = g[~g["claims_unbiased"]]
        out.append({"setting": f"{env}, {setting}",
                    "fp": f"{int(fp['rejected'].sum())}/{int(fp['tested'].sum())}",
                    "fp_rate": fmt(fp["rejected"].sum() / max(fp["tested"].sum(), 1), 2),
                    "power": "; ".join(f"`{r['estimator']}` {r['rejected']}/{r['tested']}"
                                       for _, r in pw.iterrows()) or "–",
                    "inconclusive": int(g["inconclusive"].sum()), "seeds": int(g["seeds"].max())})
    return out
