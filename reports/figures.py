"""The report's figures (matplotlib's Agg backend), each as PNG bytes or a one-line note.

Estimators are grouped by family (returns, baselines, critics, final formula, group estimators);
each keeps one colour and marker in every figure (``styles``), and figures with many estimators
are small multiples, one row of panels per family, instead of one crowded legend. Bias and
variance are exact where the estimator has exact moments, sampled (and marked) where it has not.
Every figure function takes the judged estimator table (``reports.verdicts.judge``) and the
``StudyData``; when the study did not vary what a figure needs, ``png`` is None and ``note`` says
why.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import matplotlib

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.transforms import Bbox
    from matplotlib.typing import RcKeyType

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter  # noqa: E402

import estimators  # noqa: E402
from suite.core.metrics import EXACT_TOL  # noqa: E402
from suite.harness.stores import OPTUNA_SCHEMES, check_reachable, mask, parse_store_url  # noqa: E402

from .load import FAMILIES, StudyData, column, family  # noqa: E402

__all__ = ["AXES", "Figure", "difficulty_figure", "make_figures", "one_factor_slice", "styles"]

C = column
WIDTH = 7.2  # inches: the text width of an A4 page with 15 mm margins
DPI = 150
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p"]
STYLES = ["-", "--", ":", "-."]
RC: dict[RcKeyType, object] = {
    "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "legend.fontsize": 6.8, "legend.title_fontsize": 7.2,
    "figure.dpi": DPI, "savefig.dpi": DPI, "svg.hashsalt": "report", "axes.titleweight": "bold"}
# tab20 with its dark shades first: neighbours in a family get different hues
PALETTE = [sns.color_palette("tab20", 20)[i] for i in (*range(0, 20, 2), *range(1, 20, 2))]


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str = ""  # how to read it
    png: bytes | None = None
    note: str | None = None  # why it is left out (png is None)


def _png(fig) -> bytes:
    """The figure as PNG bytes (no timestamp or version in the file); the figure is closed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def _close_new(before: set[int]) -> None:
    """Close the figures opened since ``before`` (plt.get_fignums()), e.g. after a failure."""
    for num in set(plt.get_fignums()) - before:
        plt.close(num)


def styles(names: list[str]) -> dict[str, tuple]:
    """estimator -> (colour, marker), the same in every figure of a report. Up to 20 estimators:
    a colour each. More: colours restart in each family (neighbours get different hues) and the
    marker tells the family; a family of more than 20 (the group estimators under every loss
    aggregation) gets a colour per base name (``grpo`` of ``grpo:agg=token-mean``) and a marker
    per variant."""
    if len(names) <= len(PALETTE):
        return {n: (PALETTE[i], MARKERS[i % len(MARKERS)]) for i, n in enumerate(names)}
    out = {}
    for f, fam in enumerate(FAMILIES):
        members = [n for n in names if family(n) == fam]
        if len(members) <= len(PALETTE):
            out.update({n: (PALETTE[i], MARKERS[f]) for i, n in enumerate(members)})
            continue
        bases = list(dict.fromkeys(n.split(":")[0] for n in members))
        colours = PALETTE if len(bases) <= len(PALETTE) else sns.color_palette("husl", len(bases))
        variants = list(dict.fromkeys(n.partition(":")[2] for n in members))
        out.update({n: (colours[bases.index(n.split(":")[0])],
                        MARKERS[variants.index(n.partition(":")[2]) % len(MARKERS)])
                    for n in members})
    return out


def _wrap(text: str, width: int = 30) -> str:
    """Break a long environment spec (garnet:S=20,A=4,...) after commas to fit a panel title."""
    lines = [""]
    for part in text.split(","):
        piece = part if not lines[-1] else "," + part
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines[-1] += ","
            lines.append(part)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def _log_ticks(ax) -> None:
    """Log axes: label the decades only (minor labels collide); an axis spanning less than about
    a decade gets ticks at 1, 2 and 5 times powers of ten instead."""
    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log":
            continue
        axis.set_minor_formatter(NullFormatter())
        lo, hi = sorted(lim)
        if lo > 0 and hi / lo < 15:
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))


def _families(judged: pd.DataFrame, names: list[str]) -> list[tuple[str, list[str]]]:
    """(family, its estimators in order) for the families present."""
    fam = judged.drop_duplicates("estimator").set_index("estimator")["family"]
    out = []
    for f in FAMILIES:
        members = [n for n in names if fam.get(n) == f]
        if members:
            out.append((f, members))
    return out


def _rows_with_families(groups: list[tuple[str, list[str]]]) -> tuple[list[str], dict, list]:
    """y positions of estimators with a gap and a label per family: (labels, pos, family spans)."""
    labels, pos, spans, y = [], {}, [], 0.0
    for fam, members in groups:
        start = y
        for n in members:
            pos[n] = y
            labels.append(n)
            y += 1
        spans.append((fam, start, y - 1))
        y += 0.6
    return labels, pos, spans


def _family_axis(ax, pos: dict, spans: list, style: dict) -> None:
    """Estimator names as y tick labels in their colours, family names on the right."""
    ax.set_yticks(list(pos.values()), list(pos))
    for tick, name in zip(ax.get_yticklabels(), pos, strict=True):
        tick.set_color(style[name][0])
        tick.set_fontfamily("DejaVu Sans Mono")
        tick.set_fontsize(6.3)
    ax.set_ylim(max(pos.values()) + 0.6, -0.6)
    for i, (_, start, end) in enumerate(spans):
        if i:
            ax.axhline(start - 0.8, color="0.6", lw=0.6)
        del end


def _legend_entries(members: list[str], style: dict) -> tuple[list, list[str]]:
    """Handles and labels of one family's legend; a family of more than 12 variants of a few
    base estimators (``grpo:agg=...``) lists the bases (colour) and the variants (marker)."""
    variants = list(dict.fromkeys(n.partition(":")[2] for n in members))
    if len(members) <= 12 or len(variants) < 2:
        return ([plt.Line2D([], [], color=style[n][0], marker=style[n][1], ms=3, lw=1)
                 for n in members], list(members))
    bases = list(dict.fromkeys(n.split(":")[0] for n in members))
    first = {b: next(n for n in members if n.split(":")[0] == b) for b in bases}
    marker = {v: style[next(n for n in members if n.partition(":")[2] == v)][1] for v in variants}
    handles = [plt.Line2D([], [], color=style[first[b]][0], lw=1.5) for b in bases]
    handles += [plt.Line2D([], [], color="0.4", marker=marker[v], ls="", ms=3.5) for v in variants]
    return handles, bases + [v or "(plain)" for v in variants]


def _family_labels(ax, spans: list) -> None:
    for fam, start, end in spans:
        ax.text(1.01, (start + end) / 2, fam, transform=ax.get_yaxis_transform(), rotation=-90,
                ha="left", va="center", fontsize=7, color="0.3")


def _family_grid(nrow: int, ncol: int, row_height: float,
                 sharex: bool | Literal["none", "all", "row", "col"] = "col"):
    """Panels in fixed margins (constrained layout costs seconds per figure on 15 panels); the
    legends to the right of the last column are kept by savefig's tight bounding box."""
    return plt.subplots(nrow, ncol, figsize=(WIDTH * 0.84, 0.45 + row_height * nrow), squeeze=False,
                        sharex=sharex, gridspec_kw={"left": 0.1, "right": 0.98, "top": 1 - 0.3 / (
                            0.45 + row_height * nrow), "bottom": 0.4 / (0.45 + row_height * nrow),
                            "hspace": 0.28, "wspace": 0.3})


# --------------------------------------------------------------------------------------------
def bias_figure(judged: pd.DataFrame, data: StudyData) -> Figure:
    """Relative bias per estimator and condition: exact where there are exact moments."""
    title = "Relative bias, exact where the estimator has exact moments"
    rows = judged[judged["verdict"] != "none"]
    names = [n for n in data.estimator_names if n in set(rows["estimator"])]
    style = styles(data.estimator_names)
    labels, pos, spans = _rows_with_families(_families(judged, names))
    envs = data.envs
    fig, axes = plt.subplots(1, len(envs), figsize=(WIDTH, 1.0 + 0.155 * (len(labels) + len(spans))),
                             sharey=True, squeeze=False, layout="constrained")
    values = rows["bias"].replace([np.inf], np.nan)
    top = max(1.0, float(np.nanmax(np.r_[values.to_numpy(dtype=float),
                                          rows[C("rel_bias_ci_high")].to_numpy(dtype=float), 0])))
    any_sampled = False
    for ax, env in zip(axes[0], envs, strict=True):
        sub = rows[rows["env"] == env]
        for name, g in sub.groupby("estimator"):
            if not g["claims_unbiased"].all():
                ax.axhspan(pos[name] - 0.5, pos[name] + 0.5, lw=0, zorder=0,
                           color="#f3d9d9" if not g["claims_unbiased"].any() else "#f9eded")
            colour, marker = style[name]
            dy = np.linspace(-0.28, 0.28, len(g)) if len(g) > 1 else np.zeros(1)
            exact = (g["source"] == "exact").to_numpy()
            x = g["bias"].to_numpy(dtype=float)
            x = np.where(exact & (x <= EXACT_TOL), 0.0, x)
            ax.scatter(x[exact], pos[name] + dy[exact], s=9, color=colour, marker=marker,
                       lw=0, zorder=3)
            if (~exact).any():
                any_sampled = True
                lo = g[C("rel_bias_ci_low")].to_numpy(dtype=float)[~exact]
                hi = g[C("rel_bias_ci_high")].to_numpy(dtype=float)[~exact]
                for y, a, b in zip(pos[name] + dy[~exact], lo, hi, strict=True):
                    if np.isfinite(a) and np.isfinite(b):
                        ax.plot([a, b], [y, y], color=colour, lw=1.0, zorder=2)
                ax.scatter(x[~exact], pos[name] + dy[~exact], s=11, facecolors="white",
                           edgecolors=[colour], marker=marker, lw=0.9, zorder=3)
        ax.set_xscale("symlog", linthresh=0.01, linscale=0.6)
        ax.set_xlim(-0.003, top * 1.6)
        ax.set_title(_wrap(data.env_labels.get(env, env)))
        ax.set_xlabel("relative bias |E ĝ − ∇J| / |∇J|")
        ax.grid(axis="x", lw=0.5, alpha=0.6)
        ax.grid(axis="y", visible=False)
    _family_axis(axes[0][0], pos, spans, style)
    _family_labels(axes[0][-1], spans)
    return Figure("bias", title, png=_png(fig), caption=(
        "One row per estimator (grouped by family), one point per condition. Filled points are "
        "exact (from the exact moments): an exactly unbiased estimator sits at 0. "
        + ("Hollow points with a line are sampled estimates with their 95% interval, for "
           "estimators without exact moments. " if any_sampled else "")
        + "Rows shaded red claim to be biased there (light red: in some conditions). The axis "
        "is linear below 0.01 and logarithmic above."))


def scale_figure(judged: pd.DataFrame, data: StudyData) -> Figure:
    """Direction and scale of the biased estimators: exact cosine against exact norm ratio."""
    title = "Direction and scale of the biased estimators"
    rows = judged[(judged["verdict"] == "biased") & (judged["source"] == "exact")]
    if rows.empty:
        return Figure("scale", title, note="Left out: no estimator is biased by its exact moments.")
    style = styles(data.estimator_names)
    names = [n for n in data.estimator_names if n in set(rows["estimator"])]
    envs = [e for e in data.envs if e in set(rows["env"])]
    cols = min(3, len(envs))
    nrow = math.ceil(len(envs) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(WIDTH, 2.3 * nrow + 0.3 + 0.14 * math.ceil(
        len(names) / 3)), squeeze=False, layout="constrained")
    for ax in axes.flat[len(envs):]:
        ax.set_visible(False)
    for ax, env in zip(axes.flat, envs, strict=False):
        sub = rows[rows["env"] == env]
        for name, g in sub.groupby("estimator"):
            colour, marker = style[name]
            ax.scatter(g["norm_ratio_shown"], g["cosine_shown"], s=14, color=colour, marker=marker,
                       lw=0, alpha=0.85)
        ax.axvline(1, color="0.5", lw=0.7, ls="--")
        ax.axhline(1, color="0.5", lw=0.7, ls="--")
        ax.set_xscale("log")
        lo = float(sub["cosine_shown"].min())
        ax.set_ylim(min(lo - 0.05 * (1 - lo) - 0.002, 0.99), 1.0 + 0.05 * (1 - min(lo, 0.99)))
        ax.set_title(_wrap(data.env_labels.get(env, env)))
        ax.set_xlabel("norm ratio |E ĝ| / |∇J| (log)")
        _log_ticks(ax)
    for ax in axes[:, 0]:
        ax.set_ylabel("cosine(E ĝ, ∇J)")
    handles = [plt.Line2D([], [], ls="", color=style[n][0], marker=style[n][1], ms=4) for n in names]
    fig.legend(handles, names, loc="outside lower center", ncol=3, frameon=False)
    return Figure("scale", title, png=_png(fig), caption=(
        "Each point is an estimator that is biased in a condition, by its exact moments. On the "
        "horizontal dashed line (cosine 1) the mean points the right way and only its length is "
        "wrong: a norm ratio of 0.9 reads 'right direction, scaled by 0.9', a bias that a larger "
        "step size undoes. Below it the direction is wrong too."))


def ratio_heatmap(judged: pd.DataFrame, data: StudyData) -> Figure:
    """Variance relative to reinforce: estimators (by family) x environments, log colours."""
    title = "Variance relative to reinforce"
    est = judged.dropna(subset=["var_ratio"])
    est = est[est["verdict"] != "none"]
    if est.empty:
        return Figure("ratio", title, note="Left out: no variance ratio was logged (reinforce "
                                           "was not run).")
    table = est.pivot_table(index="estimator", columns="env", values="var_ratio", aggfunc="median")
    sampled = est.groupby(["estimator", "env"])["source"].agg(lambda s: (s != "exact").all())
    groups = _families(est, [n for n in data.estimator_names if n in table.index])
    order = [n for _, members in groups for n in members]
    table = table.reindex(order)
    vals = table.to_numpy(dtype=float)
    finite = vals[np.isfinite(vals) & (vals > 0)]
    # at most two decades each way: beyond, the colour saturates (the numbers are in the cells)
    span = min(max(abs(math.log10(finite.min())), abs(math.log10(finite.max())), 0.5), 2.0)
    annot = [[("" if not np.isfinite(v) else f"{v:.3g}" + ("ˢ" if sampled.get((n, e), False) else ""))
              for v, e in zip(row, table.columns, strict=True)] for n, row in zip(order, vals, strict=True)]
    width = min(WIDTH, 3.0 + 1.1 * table.shape[1])
    fig, ax = plt.subplots(figsize=(width, 1.3 + 0.17 * table.shape[0]), layout="constrained")
    sns.heatmap(table, ax=ax, cmap="RdBu_r", norm=LogNorm(10 ** -span, 10 ** span),
                annot=np.array(annot, dtype=object), fmt="", annot_kws={"fontsize": 6.2},
                linewidths=0.4, linecolor="white", cbar_kws={"label": "variance / reinforce's (log)"})
    ax.set_yticks(np.arange(len(order)) + 0.5, order)
    style = styles(data.estimator_names)
    for tick, name in zip(ax.get_yticklabels(), order, strict=True):
        tick.set_color(style[name][0])
        tick.set_fontfamily("DejaVu Sans Mono")
        tick.set_fontsize(6.3)
    y = 0
    for _, members in groups[:-1]:
        y += len(members)
        ax.axhline(y, color="0.25", lw=1.0)
    ax.set_xticks(np.arange(table.shape[1]) + 0.5,
                  [_wrap(data.env_labels.get(c, str(c)), 18) for c in table.columns], rotation=0)
    ax.set_xlabel("")
    ax.set_ylabel("")
    several = data.conditions.groupby("env").size().max() > 1
    return Figure("ratio", title, png=_png(fig), caption=(
        "Variance of one trajectory's estimate divided by reinforce's, exact"
        + (" (median over the conditions of each environment)" if several else "")
        + "; ˢ: sampled, paired on the same trajectories (no exact moments). Blue: less variance "
        "than reinforce; red: more (the colour saturates beyond a factor 100). Lines separate "
        "the families."))


# ------------------------------------------------------------------ one factor at a time
AXES = (("horizon", "horizon", "horizon H (steps)", "horizon"),
        ("gamma", "gamma", "discount γ", "discount γ"),
        ("progress", "policy", "training progress F", "training progress"))


def one_factor_slice(conditions: pd.DataFrame, axis: str, key: str, free: list[str]) -> pd.DataFrame:
    """Per environment, the conditions that vary ``axis`` alone: those whose other parameters
    (every condition key but ``key`` and trajectories, and the free parameters) are equal, the
    group with the most distinct values of ``axis`` (the base point of a one-factor design)."""
    others = [k for k in ("policy", "gamma", "horizon", "batch_size", "shared_start", *free)
              if k != key and k != "free:seed"]
    out = []
    for _, env in conditions.dropna(subset=[axis]).groupby("env"):
        best = None
        for _, g in env.groupby(others, dropna=False):
            n = g[axis].nunique()
            if best is None or n > best[axis].nunique():
                best = g
        if best is not None and best[axis].nunique() >= 2:
            out.append(best)
    return pd.concat(out) if out else conditions.iloc[:0]


def _base_point(sl: pd.DataFrame, axis: str, key: str) -> str:
    parts = []
    for k, label in (("policy", "policy"), ("gamma", "γ"), ("horizon", "H")):
        if k == key:
            continue
        values = sorted(set(sl[k].astype(str)))
        if len(values) == 1:
            parts.append(f"{label} = {values[0]}")
    del axis
    return ", ".join(parts)


def against_figure(judged: pd.DataFrame, data: StudyData, axis: str, key: str, xlabel: str,
                   what: str) -> Figure:
    """Exact variance against one condition axis, the others at the base point: one row of
    panels per family, one column per environment; reinforce dashed in every panel."""
    title = f"Variance against the {what}"
    fig_key = axis if axis != "gamma" else "gamma"
    sl = one_factor_slice(data.conditions, axis, key, data.free_params)
    if sl.empty:
        values = sorted(data.conditions[axis].dropna().unique())
        if axis == "progress" and not values:
            return Figure(fig_key, title, note="Left out: no policy of this study lies on the "
                                               "training path (trained:fraction=F, or uniform as F = 0).")
        shown = ", ".join(f"{v:g}" for v in values) or "none"
        return Figure(fig_key, title, note=f"Left out: the study did not vary the {what} alone "
                                           f"(values: {shown}).")
    rows = judged[judged["condition_run"].isin(sl["condition_run"]) & (judged["source"] == "exact")]
    rows = rows.dropna(subset=[C("exact_variance")])
    if rows.empty:
        return Figure(fig_key, title, note=f"Left out: no exact variance along the {what}.")
    style = styles(data.estimator_names)
    names = [n for n in data.estimator_names if n in set(rows["estimator"])]
    groups = _families(rows, names)
    envs = sorted(rows["env"].unique())
    med = rows.groupby(["env", "estimator", axis])[C("exact_variance")].median().reset_index()
    nrow, ncol = len(groups), len(envs)
    fig, axes = _family_grid(nrow, ncol, 1.55)
    points = sl.groupby("env")[axis].nunique()
    for j, env in enumerate(envs):
        sub = med[med["env"] == env]
        ref = sub[sub["estimator"] == "reinforce"].sort_values(axis)
        values = sorted(sub[axis].unique())
        for i, (_, members) in enumerate(groups):
            ax = axes[i][j]
            if len(ref) and "reinforce" not in members:
                ax.plot(ref[axis], ref[C("exact_variance")], color="0.55", lw=1.0, ls="--",
                        zorder=1)
            for n in members:
                line = sub[sub["estimator"] == n].sort_values(axis)
                if line.empty:
                    continue
                colour, marker = style[n]
                ax.plot(line[axis], line[C("exact_variance")], color=colour, marker=marker, ms=2.8,
                        lw=1.0, label=n, zorder=2)
            ax.set_yscale("log")
            if axis != "gamma" and len(values) > 2 and min(values) > 0 and max(values) / min(values) >= 10:
                ax.set_xscale("log")
                ax.set_xticks(values, [f"{v:g}" for v in values])
                ax.minorticks_off()
            _log_ticks(ax)
            ax.tick_params(labelsize=6.3)
            if i == 0:
                ax.set_title(_wrap(data.env_labels.get(env, env))
                             + f"  ({int(points.get(env, 0))} points)", fontsize=7.5)
            if i == nrow - 1:
                ax.set_xlabel(xlabel)
        axes[0][0].set_ylabel("")
    for i, (fam, members) in enumerate(groups):
        axes[i][0].set_ylabel(f"{fam}\nvariance (log)", fontsize=7)
        handles, labels = _legend_entries(members, style)
        extra = [] if "reinforce" in members else ["reinforce"]
        handles += [plt.Line2D([], [], color="0.55", ls="--", lw=1)] * len(extra)
        axes[i][-1].legend(handles, [*labels, *extra], loc="center left",
                           bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=6,
                           handlelength=1.6, borderaxespad=0)
    base = _base_point(sl, axis, key)
    return Figure(fig_key, title, png=_png(fig), caption=(
        f"Exact variance of one trajectory's estimate (trace of its covariance, log scale) "
        f"against the {what}"
        + (" (trained:fraction=F is F of the way from the uniform policy's return to the optimal "
           "one; uniform is F = 0)" if axis == "progress" else "")
        + (f", the other parameters at the base point ({base})" if base else "")
        + ". One row per family; the dashed grey line is reinforce in every panel. Parallel "
        "lines mean a constant variance ratio; a steeper one, variance that grows faster."))


def bias_axes_figure(judged: pd.DataFrame, data: StudyData) -> Figure:
    """Exact relative bias of the biased estimators against horizon, discount and progress."""
    title = "Exact bias against the horizon, the discount and training progress"
    panels = []
    for axis, key, xlabel, _ in AXES:
        sl = one_factor_slice(data.conditions, axis, key, data.free_params)
        if sl.empty:
            continue
        rows = judged[judged["condition_run"].isin(sl["condition_run"])
                      & (judged["source"] == "exact")]
        biased = set(rows.loc[rows["verdict"] == "biased", "estimator"])
        if biased:
            panels.append((axis, xlabel, rows[rows["estimator"].isin(biased)]))
    if not panels:
        return Figure("bias_axes", title, note="Left out: no estimator is biased by its exact "
                                               "moments along a varied horizon, discount or "
                                               "training progress.")
    style = styles(data.estimator_names)
    envs = sorted({e for _, _, r in panels for e in r["env"]})
    fig, axes = plt.subplots(len(panels), len(envs), figsize=(WIDTH, 0.6 + 1.7 * len(panels)),
                             squeeze=False, layout="constrained")
    names = []
    for i, (axis, xlabel, rows) in enumerate(panels):
        med = rows.groupby(["env", "estimator", axis])["bias"].median().reset_index()
        for j, env in enumerate(envs):
            ax = axes[i][j]
            sub = med[med["env"] == env]
            for n in [n for n in data.estimator_names if n in set(sub["estimator"])]:
                line = sub[sub["estimator"] == n].sort_values(axis)
                colour, marker = style[n]
                ax.plot(line[axis], line["bias"].clip(lower=0), color=colour, marker=marker, ms=2.8,
                        lw=1.0)
                names.append(n)
            ax.set_yscale("symlog", linthresh=0.01, linscale=0.5)
            ax.set_ylim(bottom=-0.002)
            ax.set_xlabel(xlabel, fontsize=7)
            ax.tick_params(labelsize=6.3)
            if i == 0:
                ax.set_title(_wrap(data.env_labels.get(env, env)), fontsize=7.5)
        axes[i][0].set_ylabel("exact relative bias", fontsize=7)
    names = [n for n in data.estimator_names if n in set(names)]
    handles = [plt.Line2D([], [], color=style[n][0], marker=style[n][1], ms=3, lw=1) for n in names]
    fig.legend(handles, names, loc="outside lower center", ncol=3, frameon=False)
    return Figure("bias_axes", title, png=_png(fig), caption=(
        "Exact relative bias |E ĝ − ∇J| / |∇J| of the estimators that are biased somewhere along "
        "the axis, the other parameters at the base point (as in the variance figures). The "
        "axis is linear below 0.01 and logarithmic above; 0 is exactly unbiased."))


def batch_figure(judged: pd.DataFrame, data: StudyData) -> Figure:
    """Relative MSE against batch size: exact where there are exact moments."""
    title = "Relative MSE against batch size"
    b = data.batch
    if b.empty:
        return Figure("batch", title, note="Left out: the runs hold no per-batch-size metrics.")
    src = judged.set_index("estimator_run")["source"]
    b = b.assign(source=b["estimator_run"].map(src))
    sizes = b["batch_size"].value_counts()
    own = None
    if len(sizes) > 1:  # an estimator's curve must not mix conditions of different batch sizes
        own = int(max(sizes[sizes == sizes.max()].index))
        b = b[b["batch_size"] == own]
    exact_col, sampled_col = C("exact_rel_mse"), C("rel_mse")
    b["value"] = b[exact_col].where(b["source"] == "exact", b.get(sampled_col))
    b = b.dropna(subset=["value"])
    if b.empty or b["B"].nunique() < 2:
        return Figure("batch", title, note=(
            "Left out: the runs hold the relative MSE at fewer than two batch sizes (exact-only "
            "conditions give it at the study's batch size only)."))
    style = styles(data.estimator_names)
    names = [n for n in data.estimator_names if n in set(b["estimator"])]
    groups = _families(judged, names)
    envs = sorted(b["env"].unique())
    med = b.groupby(["env", "estimator", "B"]).agg(value=("value", "median"),
                                                   source=("source", "first")).reset_index()
    fig, axes = _family_grid(len(groups), len(envs), 1.5, sharex=True)
    for j, env in enumerate(envs):
        sub = med[med["env"] == env]
        for i, (_, members) in enumerate(groups):
            ax = axes[i][j]
            for n in members:
                line = sub[sub["estimator"] == n].sort_values("B")
                if line.empty:
                    continue
                colour, marker = style[n]
                ls = "-" if (line["source"] == "exact").all() else ":"
                ax.plot(line["B"], line["value"], color=colour, marker=marker, ms=2.8, lw=1, ls=ls)
            ax.axhline(0.1, color="grey", lw=0.7, ls="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            _log_ticks(ax)
            ax.tick_params(labelsize=6.3)
            if i == 0:
                ax.set_title(_wrap(data.env_labels.get(env, env)), fontsize=7.5)
            if i == len(groups) - 1:
                ax.set_xlabel("batch size B (log)", fontsize=7)
    for i, (fam, members) in enumerate(groups):
        axes[i][0].set_ylabel(f"{fam}\nrelative MSE (log)", fontsize=7)
        handles, labels = _legend_entries(members, style)
        axes[i][-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5),
                           frameon=False, fontsize=6, handlelength=1.6, borderaxespad=0)
    several = b.groupby(["env", "estimator", "B"])["condition_run"].nunique().max() > 1
    return Figure("batch", title, png=_png(fig), caption=(
        "Relative MSE |ĝ_B − ∇J|² / |∇J|² of the mean of B trajectories, exact (solid: the "
        "squared relative bias plus the batch variance over |∇J|²; dotted: sampled, for "
        "estimators without exact moments)" + (", median over the sampled conditions" if several
                                                else "")
        + (f", of the conditions with batch size {own} (the study varies it)" if own else "")
        + ". The dashed line is 0.1. An unbiased estimator falls like 1/B; a biased one levels "
        "off at its squared relative bias."))


def agreement_figure(judged: pd.DataFrame, data: StudyData) -> Figure:
    """The sampling check: z of the sampled mean and sampled / exact variance per estimator."""
    title = "Sampling against the exact moments"
    rows = judged.dropna(subset=[C("agreement_z")])
    if rows.empty:
        return Figure("agreement", title, note="Left out: no condition was both sampled and exact.")
    style = styles(data.estimator_names)
    names = [n for n in data.estimator_names if n in set(rows["estimator"])]
    labels, pos, spans = _rows_with_families(_families(rows, names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(WIDTH, 1.0 + 0.15 * (len(labels) + len(spans))),
                                   sharey=True, layout="constrained")
    for name, g in rows.groupby("estimator"):
        colour, marker = style[name]
        dy = np.linspace(-0.25, 0.25, len(g)) if len(g) > 1 else np.zeros(1)
        ax1.scatter(g[C("agreement_z")].clip(-8, 8), pos[name] + dy, s=9, color=colour,
                    marker=marker, lw=0)
        vr = g[C("agreement_variance_ratio")].to_numpy(dtype=float)
        lo = g[C("agreement_variance_ratio_ci_low")].to_numpy(dtype=float)
        hi = g[C("agreement_variance_ratio_ci_high")].to_numpy(dtype=float)
        for y, a, b in zip(pos[name] + dy, lo, hi, strict=True):
            if np.isfinite(a) and np.isfinite(b):
                ax2.plot([a, b], [y, y], color=colour, lw=0.9)
        ax2.scatter(vr, pos[name] + dy, s=9, color=colour, marker=marker, lw=0, zorder=3)
    ax1.axvspan(-1.96, 1.96, color="#e8f0e8", zorder=0)
    ax1.axvline(0, color="0.5", lw=0.6)
    ax1.set_xlabel("z: (sampled − exact mean) / standard error")
    ax2.axvline(1, color="0.5", lw=0.6)
    ax2.set_xscale("log")
    _log_ticks(ax2)
    ax2.set_xlabel("variance: sampled / exact, 95% interval (log)")
    for ax in (ax1, ax2):
        ax.grid(axis="y", visible=False)
    _family_axis(ax1, pos, spans, style)
    _family_labels(ax2, spans)
    return Figure("agreement", title, png=_png(fig), caption=(
        "The check of the sampler, the estimator code and the exact engine against each other, "
        "one point per sampled condition. Left: the sampled mean minus the exact mean along the "
        "bias direction (the gradient when unbiased), in standard errors from the exact variance "
        "(green band: |z| < 1.96, where 95% of the points should fall). Right: the sampled "
        "variance over the exact one with its bootstrap interval (1: agreement)."))


def difficulty_figure(rows: pd.DataFrame, prompts: list[tuple[str, float]]) -> Figure:
    """Group estimators: the exact scale of the mean against the group size, per prompt."""
    title = "Group estimators: exact scale per prompt against the group size"
    rows = rows[rows["source"] == "exact"]
    bases = list(dict.fromkeys(rows["base"]))
    if rows.empty or rows["batch_size"].nunique() < 2:
        return Figure("difficulty", title, note="Left out: fewer than two group sizes with exact "
                                                "moments.")
    colours = sns.color_palette("viridis", len(prompts))
    with sns.axes_style("whitegrid"), plt.rc_context(RC):
        cols = min(4, len(bases))
        nrow = math.ceil(len(bases) / cols)
        fig, axes = plt.subplots(nrow, cols, figsize=(WIDTH, 0.5 + 1.6 * nrow), squeeze=False,
                                 sharex=True, layout="constrained")
        for ax in axes.flat[len(bases):]:
            ax.set_visible(False)
        for ax, base in zip(axes.flat, bases, strict=False):
            sub = rows[rows["base"] == base]
            for k, ((env, p), colour) in enumerate(zip(prompts, colours, strict=True)):
                line = sub[sub["env"] == env].sort_values("batch_size")
                ax.plot(line["batch_size"], line["norm_ratio_shown"], marker=MARKERS[k],
                        ms=5 - 1.2 * k, lw=1.6 - 0.4 * k, ls=STYLES[k % len(STYLES)],
                        color=colour, label=f"p = {p:.2f}")  # equal lines stay visible
            ax.axhline(1, color="0.5", lw=0.7, ls="--")
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, 0.9), max(hi, 1.1))
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
            ax.set_xscale("log", base=2)
            sizes = sorted(sub["batch_size"].unique())
            ax.set_xticks(sizes, [f"{int(g)}" for g in sizes])
            ax.minorticks_off()
            ax.set_title(base, fontsize=7.5)
            ax.tick_params(labelsize=6.3)
        for ax in axes[-1]:
            ax.set_xlabel("group size G", fontsize=7)
        for ax in axes[:, 0]:
            ax.set_ylabel("|E ĝ| / |∇J|", fontsize=7)
        handles = [plt.Line2D([], [], color=c, marker=MARKERS[k], ms=5 - 1.2 * k, lw=1.6 - 0.4 * k,
                              ls=STYLES[k % len(STYLES)]) for k, c in enumerate(colours)]
        fig.legend(handles, [f"prompt with pass rate {p:.2f}" for _, p in prompts],
                   loc="outside lower center", ncol=len(prompts), frameon=False)
        png = _png(fig)
    return Figure("difficulty", title, png=png, caption=(
        "Exact norm ratio of each group estimator's mean (loss summed over tokens) against the "
        "group size, one line per prompt (lines of prompts with pass rates p and 1 − p often "
        "coincide: GRPO's scale is symmetric in p). At 1 (dashed grey) the estimator is unbiased; "
        "a constant "
        "line is a scale a step size absorbs; lines that differ between prompts are the "
        "difficulty bias."))


# ------------------------------------------------------------------------------- GAE front
_OFFSETS = [(d * dx, d * dy) for d in (1.0, 1.8, 2.6) for dx, dy in
            ((7, 7), (7, -7), (-7, 7), (-7, -7), (0, 11), (0, -11), (11, 0), (-11, 0))]


def _place_labels(ax, xy, texts: list[str], all_points) -> None:
    """Annotate points with short texts at the nearby spot that overlaps the fewest other labels
    and points and stays inside the axes (a leader line joins text and point)."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 3 * ax.figure.dpi / 72.0
    dots = [ax.transData.transform(p) for p in all_points]
    taken: list[Bbox] = []
    for (x, y), text in zip(xy, texts, strict=True):
        best = None
        for dx, dy in _OFFSETS:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                              ha="left" if dx > 0 else "right" if dx < 0 else "center",
                              va="center", fontsize=6.5, zorder=4,
                              arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.35",
                                          "shrinkA": 0, "shrinkB": 3})
            ann.set_in_layout(False)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer).expanded(1.08, 1.15)
            cost = (20 * (not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)))
                    + 10 * sum(box.overlaps(t) for t in taken)
                    + 5 * sum(box.x0 - pad <= px <= box.x1 + pad and box.y0 - pad <= py <= box.y1 + pad
                              for px, py in dots))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None  # _OFFSETS is not empty
        taken.append(best[2])


def _gae_points(names: list[str]) -> pd.DataFrame:
    """GAE variants with their lambda and critic family (from the estimator registry)."""
    rows = []
    for name in names:
        try:
            params = estimators.get(name).params
        except Exception:  # a name the installed registry no longer knows
            continue
        if "lam" in params:
            critic = params.get("critic", "exact")
            if params.get("sigma"):
                critic += f", σ={params['sigma']:g}"
            rows.append({"estimator": name, "lam": float(params["lam"]), "critic": critic})
    return pd.DataFrame(rows, columns=["estimator", "lam", "critic"])


def _front(points: pd.DataFrame) -> pd.DataFrame:
    """Points not dominated in (variance, sq_bias), both minimised, sorted by variance."""
    pts = points.sort_values(["variance", "sq_bias"])
    keep, best = [], math.inf
    for _, r in pts.iterrows():
        if r["sq_bias"] < best:
            keep.append(r)
            best = r["sq_bias"]
    return pd.DataFrame(keep)


def gae_figure(judged: pd.DataFrame, data: StudyData) -> Figure:
    """GAE: the bias-variance Pareto front over λ, per critic (exact where possible)."""
    title = "GAE: the bias-variance Pareto front over λ"
    gae = _gae_points(data.estimator_names)
    families = gae.groupby("critic")["lam"].nunique() if not gae.empty else pd.Series(dtype=int)
    families = sorted(families[families > 1].index)
    if not families:
        return Figure("gae", title, note=(
            "Left out: the study has no GAE variants with different λ for the same critic."))
    est = judged[judged["verdict"] != "none"].merge(gae[gae["critic"].isin(families)], on="estimator")
    exact = est["source"] == "exact"
    est = est.assign(variance=est[C("exact_variance")].where(exact, est[C("variance")]),
                     sq_bias=(est["bias"] ** 2).where(exact, est[C("rel_sq_bias_debiased")]))
    pts = est.groupby(["env", "critic", "lam"])[["variance", "sq_bias"]].median().reset_index()
    pts["sq_bias"] = pts["sq_bias"].clip(lower=0.0)
    positive = pts.loc[pts["sq_bias"] > 1e-12, "sq_bias"]
    lin = float(10 ** math.floor(math.log10(positive.min()))) if len(positive) else 1e-4
    envs: list[str] = sorted(pts["env"].unique())
    cols = min(3, len(envs))
    nrow = math.ceil(len(envs) / cols)
    fig, grid = plt.subplots(nrow, cols, figsize=(WIDTH if len(envs) > 1 else WIDTH * 0.75,
                                                  (3.0 if len(envs) > 1 else 3.6) * nrow + 0.4),
                             squeeze=False, layout="constrained")
    for ax in grid.flat[len(envs):]:
        ax.set_visible(False)
    axes = list(grid.flat[:len(envs)])
    norm = Normalize(0.0, 1.0)
    fam_marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}
    labels = []
    panel_env: dict[Axes, str] = dict(zip(axes, envs, strict=True))
    for ax, env in panel_env.items():
        sub = pts[pts["env"] == env]
        for fam in families:
            f = sub[sub["critic"] == fam]
            ax.scatter(f["variance"], f["sq_bias"], c=f["lam"], cmap="viridis", norm=norm,
                       marker=fam_marker[fam], s=28, edgecolors="black", linewidths=0.4, zorder=3)
            front = _front(f)
            ax.plot(front["variance"], front["sq_bias"], color="black", lw=0.8, zorder=2)
            labelled = f if len(f) <= 6 else front
            labels.append((ax, labelled[["variance", "sq_bias"]].to_numpy().tolist(),
                           [f"λ={lam:.2g}" for lam in labelled["lam"]]))
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=lin, linscale=0.5)
        ax.set_ylim(-lin, max(float(sub["sq_bias"].max()) * 4, lin * 2))
        ax.set_yticks([t for t in ax.get_yticks() if t >= 0])
        ax.margins(x=0.2)
        _log_ticks(ax)
        ax.set_title(_wrap(data.env_labels.get(env, env)))
        ax.set_xlabel("variance per trajectory (log)")
    axes[0].set_ylabel("relative squared bias")
    cbar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes, fraction=0.05,
                        pad=0.02, aspect=25)
    cbar.set_label("λ", rotation=0, labelpad=6)
    handles = [plt.Line2D([], [], ls="", marker=fam_marker[f], color="lightgrey", mec="black", ms=5)
               for f in families]
    fig.legend(handles, [f"critic: {f}" for f in families], title="GAE family",
               loc="outside lower center", ncol=min(3, len(families)), frameon=False)
    fig.canvas.draw()
    for ax in axes:
        xy = [p for a, q, _ in labels if a is ax for p in q]
        dots = pts.loc[pts["env"] == panel_env[ax], ["variance", "sq_bias"]].to_numpy().tolist()
        _place_labels(ax, xy, [t for a, _, ts in labels if a is ax for t in ts], dots)
    return Figure("gae", title, png=_png(fig), caption=(
        "Each point is a GAE variant, coloured by λ: exact variance and exact squared relative "
        "bias (sampled and debiased where there are no exact moments; below 0 drawn at 0), "
        "medians over each environment's conditions. The black line joins the variants that no "
        "other variant with the same critic beats in both (the Pareto front). Down and left is "
        f"better. The y axis is linear below {lin:g} and logarithmic above."))


# ----------------------------------------------------------------------------------- Optuna
def optuna_figures(data: StudyData) -> list[Figure]:
    """Optuna's own plots for search studies, from the storage named by the invocation runs."""
    inv = data.invocations
    title = "Optuna search"
    if data.sampler == "grid":
        return []
    storage = inv["tag:optuna_storage"].dropna().iloc[-1] if "tag:optuna_storage" in inv else None
    study, why = _open_optuna(data.name, storage)
    if study is None:
        return [Figure("optuna", title, note=f"Left out: {why}")]
    import optuna.visualization.matplotlib as ovm

    multi = len(study.directions) > 1
    names = _objective_names(data, len(study.directions))
    plots: list[tuple[str, str, Callable, str]] = []
    if multi:
        plots.append(("optuna_pareto", "Optuna: Pareto front of the objectives",
                      lambda: ovm.plot_pareto_front(study, target_names=names),
                      "Every complete trial; the Pareto-optimal ones are highlighted."))
    for i in range(len(study.directions)):
        target = (lambda t, i=i: t.values[i]) if multi else None
        suffix = f" (objective {i})" if multi else ""
        plots.append((f"optuna_history_{i}", f"Optuna: optimization history{suffix}",
                      lambda target=target, i=i: ovm.plot_optimization_history(
                          study, target=target, target_name=names[i]),
                      "Objective value of each trial in order, and the best so far."))
        plots.append((f"optuna_importance_{i}", f"Optuna: parameter importances{suffix}",
                      lambda target=target, i=i: ovm.plot_param_importances(
                          study, target=target, target_name=names[i]),
                      "How much of the objective's variation each searched parameter explains "
                      "(fANOVA)."))
    searched = {k for t in study.get_trials(deepcopy=False) for k in t.params}
    out, notes = [], []
    if len(searched) < 2:  # importances of a single parameter are 1 by definition
        plots = [p for p in plots if not p[0].startswith("optuna_importance")]
        notes.append(Figure("optuna_importance", "Optuna: parameter importances", note=(
            f"Left out: the search has {len(searched)} parameter "
            f"({', '.join(sorted(searched)) or 'none'}); a single parameter's importance is 1.")))
    for key, ptitle, plot, caption in plots:
        before = set(plt.get_fignums())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot()
            fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
            fig.set_size_inches(WIDTH * 0.8, 3.4)
            fig.set_layout_engine("constrained")
            out.append(Figure(key, ptitle, png=_png(fig), caption=caption))
        except Exception as exc:  # e.g. too few complete trials for importances
            _close_new(before)
            out.append(Figure(key, ptitle, note=f"Left out: Optuna could not draw it ({_why(exc)})."))
    return out + notes


def _why(exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _objective_names(data: StudyData, n: int) -> list[str]:
    """Objective i's metric (and estimator, when they differ), from the logged study file."""
    import tomllib

    for text in data.study_files.values():
        try:
            objs = tomllib.loads(text).get("objectives", [])
        except tomllib.TOMLDecodeError:
            continue
        if len(objs) == n:
            ests = {o.get("estimator") for o in objs}
            return [o.get("metric", f"objective {i}") + ("" if len(ests) == 1 else
                                                         f" of {o.get('estimator')}")
                    for i, o in enumerate(objs)]
    return [f"objective {i}" for i in range(n)]


def _open_optuna(name: str, storage: str | None):
    """(study, None) or (None, reason); never creates a storage that does not exist. The runs
    record the storage URL with its password masked: the password then comes from libpq's own
    sources (PGPASSWORD, ~/.pgpass)."""
    import optuna

    if not storage:
        return None, "the invocation runs name no Optuna storage."
    shown = mask(storage)
    url = storage.replace(":***@", "@")
    try:
        store = parse_store_url(url, "Optuna storage", OPTUNA_SCHEMES)
        if store.kind == "sqlite" and not store.file.is_file():
            return None, f"the Optuna storage {shown} cannot be opened (no such file)."
        check_reachable(store)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=name, storage=url), None
    except Exception as exc:
        return None, f"the Optuna storage {shown} cannot be opened ({type(exc).__name__})."


def _axis_figures() -> list:
    return [lambda j, d, a=a: against_figure(j, d, *a) for a in AXES]


FIGURES = (bias_figure, scale_figure, ratio_heatmap, *_axis_figures(), bias_axes_figure,
           batch_figure, agreement_figure, gae_figure)


def make_figures(judged: pd.DataFrame, data: StudyData) -> dict[str, Figure]:
    """Every figure of the report by key, in order (left-out ones carry a note instead of a PNG)."""
    out: dict[str, Figure] = {}
    titles = ["Relative bias", "Direction and scale", "Variance relative to reinforce",
              "Variance against the horizon", "Variance against the discount",
              "Variance against training progress", "Exact bias along the axes",
              "Relative MSE against batch size", "Sampling against the exact moments", "GAE"]
    keys = ["bias", "scale", "ratio", "horizon", "gamma", "progress", "bias_axes", "batch",
            "agreement", "gae"]
    with sns.axes_style("whitegrid"), plt.rc_context(RC):
        for make, key, title in zip(FIGURES, keys, titles, strict=True):
            before = set(plt.get_fignums())
            try:
                fig = make(judged, data)
            except Exception as exc:  # one figure the data cannot make must not cost the report
                _close_new(before)
                fig = Figure(key, title, note=f"Left out: it could not be drawn ({_why(exc)}).")
            out[key] = fig
        for fig in optuna_figures(data):
            out[fig.key] = fig
    return out
