"""The report's figures (seaborn on matplotlib's Agg backend), each as PNG bytes or a one-line note.

Every figure function takes a ``StudyData`` and returns a ``Figure``: when the study did not vary
what the figure needs (one horizon only, no GAE variants, ...), ``png`` is None and ``note`` says
why. Colours and markers of an estimator are the same in every figure.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402

import estimators  # noqa: E402
from suite.harness.stores import OPTUNA_SCHEMES, check_reachable, mask, parse_store_url  # noqa: E402

from .load import StudyData  # noqa: E402

__all__ = ["Figure", "make_figures"]

WIDTH = 7.2  # inches: the text width of an A4 page with 15 mm margins
DPI = 150
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p"]
RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7,
      "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7.5,
      "figure.dpi": DPI, "savefig.dpi": DPI, "svg.hashsalt": "report", "axes.titleweight": "bold"}


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


def _style(names: list[str]) -> dict[str, tuple]:
    """estimator -> (colour, marker), fixed by the estimator's position in the study."""
    colours = sns.color_palette("tab20", 20) + sns.color_palette("Dark2", 8)
    if len(names) > len(colours):
        colours = sns.color_palette("husl", len(names))
    return {n: (colours[i], MARKERS[i % len(MARKERS)]) for i, n in enumerate(names)}


def _wrap(text: str, width: int = 26) -> str:
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


def _spans_decades(values, factor: float = 20.0) -> bool:
    v = np.asarray([x for x in values if np.isfinite(x) and x > 0])
    return v.size > 1 and v.max() / v.min() >= factor


def _legend_below(fig, handles, labels, title: str, ncol: int = 3) -> None:
    fig.legend(handles, labels, title=title, loc="outside lower center", ncol=ncol, frameon=False,
               columnspacing=1.2, handlelength=2.2)


def _no_minor_labels(ax) -> None:
    """Log axes: label the decades only (minor labels such as 2x10^4 collide); an axis spanning
    less than about a decade gets ticks at 1, 2 and 5 times powers of ten instead."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log":
            continue
        axis.set_minor_formatter(NullFormatter())
        lo, hi = sorted(lim)
        if lo > 0 and hi / lo < 15:
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))


def _legend_height(entries: int, ncol: int = 3) -> float:
    """Inches a legend below the panels takes (title and one line per row of entries)."""
    return 0.35 + 0.16 * math.ceil(entries / ncol)


def _grid(n: int, height: float, max_cols: int = 3, width: float = WIDTH, extra: float = 0.0):
    """Panels of ``height`` inches in rows of at most max_cols, plus ``extra`` inches (legend)."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width, height * rows + extra), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


# --------------------------------------------------------------------------------------------
def bias_figure(data: StudyData) -> Figure:
    """Relative bias with 95% intervals: one row per estimator, one point per condition."""
    title = "Relative bias with 95% intervals"
    est = data.estimators
    names = data.estimator_names
    labels = list(dict.fromkeys(data.conditions["label"]))  # condition order
    per_row = int(est.groupby(["env", "estimator"]).size().max())
    envs = data.envs
    height = max(2.6, 1.2 + 0.2 * len(names) * (1 + 0.12 * min(per_row - 1, 8)))
    fig, axes = plt.subplots(1, len(envs), figsize=(WIDTH, height), sharey=True, squeeze=False,
                             layout="constrained")
    coloured = 1 < len(labels) <= 12  # more conditions: one colour, no legend
    palette = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 2)
    colour = {lab: palette[i] if coloured else palette[0] for i, lab in enumerate(labels)}
    ypos = {n: i for i, n in enumerate(names)}
    top = max(1.0, float(np.nanmax(est[["rel_bias", "rel_bias_hi"]].to_numpy())))
    for ax, env in zip(axes[0], envs, strict=True):
        sub = est[est["env"] == env]
        claims = sub.groupby("estimator")["claims_unbiased"].agg(["all", "any"])
        for n, c in claims.iterrows():
            if not c["all"]:  # claimed biased in every condition (dark) or in some (light)
                ax.axhspan(ypos[n] - 0.5, ypos[n] + 0.5, lw=0, zorder=0,
                           color="#f3d9d9" if not c["any"] else "#f9eded")
        for n, rows in sub.groupby("estimator"):
            rows = rows.sort_values("label", key=lambda col: col.map(labels.index))
            dy = np.linspace(-0.3, 0.3, len(rows)) if len(rows) > 1 else [0.0]
            for off, (_, r) in zip(dy, rows.iterrows(), strict=True):
                y, c = ypos[n] + off, colour[r["label"]]
                if pd.notna(r["rel_bias_lo"]) and pd.notna(r["rel_bias_hi"]):
                    ax.plot([r["rel_bias_lo"], r["rel_bias_hi"]], [y, y], color=c, lw=1.2,
                            zorder=2)
                ax.plot(r["rel_bias"], y, "o", ms=3.2, color=c, zorder=3,
                        mec="black" if r["rejects"] else c, mew=0.6)
        ax.set_xscale("symlog", linthresh=0.01, linscale=0.6)
        ax.set_xlim(-0.002, top * 1.5)
        ax.set_title(_wrap(env))
        ax.set_xlabel("relative bias |E[ĝ] − ∇J| / |∇J|")
        ax.grid(axis="x", which="major", lw=0.5, alpha=0.6)
        ax.grid(axis="y", visible=False)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].set_ylim(len(names) - 0.5, -0.5)
    if coloured:
        handles = [plt.Line2D([], [], color=colour[lab], marker="o", lw=1.2, ms=4) for lab in labels]
        widest = max(len(lab) for lab in labels)
        _legend_below(fig, handles, labels, "condition", ncol=max(1, min(4, 120 // (widest + 6))))
    return Figure("bias", title, png=_png(fig), caption=(
        "Each row is an estimator; each point is one condition"
        + ("" if coloured or len(labels) == 1 else " (the tables list them)")
        + ", with its 95% interval as a line (hidden behind the point when it is narrow; "
        "the tables give the numbers). "
        "Rows shaded red are estimators that claim to be biased there (light red: in some of the "
        "conditions). A black rim marks a point whose test rejects 'mean = ∇J' at level 0.05. "
        "The axis is linear below 0.01 and logarithmic above; 0 means no bias above the noise "
        "floor."))


def ratio_heatmap(data: StudyData) -> Figure:
    """Variance relative to reinforce: estimators x environments (or conditions), log colours."""
    est = data.estimators.dropna(subset=["var_ratio"])
    title = "Variance relative to reinforce"
    if est.empty:
        return Figure("ratio", title, note="Left out: no variance ratio was logged (reinforce was "
                                           "not run).")
    by_env = len(data.envs) > 1
    column = "env" if by_env else "label"
    table = est.pivot_table(index="estimator", columns=column, values="var_ratio", aggfunc="median")
    table = table.reindex([n for n in data.estimator_names if n in table.index])
    if not by_env:
        table = table[sorted(table.columns, key=lambda c: data.conditions.index[
            data.conditions["label"] == c][0])]
    vals = table.to_numpy(dtype=float)
    finite = vals[np.isfinite(vals) & (vals > 0)]
    span = max(abs(math.log10(finite.min())), abs(math.log10(finite.max())), 0.5)
    norm = LogNorm(10 ** -span, 10 ** span)
    table.columns = [_wrap(str(c), 18) for c in table.columns]
    lines = max(str(c).count("\n") + 1 for c in table.columns)
    width = min(WIDTH, 2.8 + 1.05 * table.shape[1])
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.15 * lines + 0.24 * table.shape[0]),
                           layout="constrained")
    sns.heatmap(table, ax=ax, cmap="RdBu_r", norm=norm, annot=True, fmt=".3g",
                annot_kws={"fontsize": 6.5}, linewidths=0.4, linecolor="white",
                cbar_kws={"label": "variance ratio to reinforce (log)"})
    ax.grid(False)
    ax.tick_params(axis="y", rotation=0)
    ax.set_xlabel("environment" if by_env else "condition")
    ax.set_ylabel("")
    long_labels = max(len(line) for c in table.columns for line in c.split("\n")) * table.shape[1] > 70
    ax.tick_params(axis="x", rotation=30 if long_labels else 0)
    if long_labels:
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    agg = ("median over the conditions of each environment" if by_env and
           data.conditions.groupby("env").size().max() > 1 else "one value per cell")
    return Figure("ratio", title, png=_png(fig), caption=(
        "Trace of the per-trajectory covariance divided by that of reinforce, paired on the same "
        f"trajectories ({agg}). Blue: less variance than reinforce; red: more. The colour scale "
        "is logarithmic and centred on 1."))


def _against(data: StudyData, key: str, xlabel: str, what: str, fig_key: str, title: str) -> Figure:
    """Variance per trajectory against one condition axis, one panel per environment."""
    est = data.estimators.dropna(subset=[key, "variance"])
    values = sorted(est[key].unique())
    if not values and key == "progress":
        return Figure(fig_key, title, note=(
            "Left out: no policy of this study lies on the training path "
            "(trained:fraction=F, or uniform as fraction 0)."))
    if len(values) < 2:
        shown = ", ".join(f"{v:g}" for v in values) or "none"
        return Figure(fig_key, title, note=(
            f"Left out: the study did not vary the {what} (one value: {shown})."))
    names = [n for n in data.estimator_names if n in set(est["estimator"])]
    style = _style(data.estimator_names)
    envs = sorted(est["env"].unique())
    med = est.groupby(["env", "estimator", key])["variance"].median().reset_index()
    counts = est.groupby(["env", "estimator", key]).size()
    grid = data.sampler == "grid"  # a search's points differ in other parameters too: no lines
    fig, axes = _grid(len(envs), 2.4, extra=_legend_height(len(names)))
    for ax, env in zip(axes, envs, strict=True):
        sub = med[med["env"] == env]
        for n in names:
            line = sub[sub["estimator"] == n].sort_values(key)
            if line.empty:
                continue
            colour, marker = style[n]
            ax.plot(line[key], line["variance"], marker=marker, color=colour, ms=3.5,
                    lw=1.1 if grid else 0, label=n)
        ax.set_yscale("log")
        if _spans_decades(values):
            ax.set_xscale("log")
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.minorticks_off()
        ax.set_title(_wrap(env))
        ax.set_xlabel(xlabel)
        _no_minor_labels(ax)
    for ax in axes[::3]:
        ax.set_ylabel("variance per trajectory\n(trace of covariance, log)")
    handles = [plt.Line2D([], [], color=style[n][0], marker=style[n][1], ms=4, lw=1.1) for n in names]
    _legend_below(fig, handles, names, "estimator", ncol=3)
    several = int(counts.max()) > 1
    return Figure(fig_key, title, png=_png(fig), caption=(
        f"Variance of one trajectory's estimate against the {what}"
        + (" (the policy trained:fraction=F is F of the way from the uniform policy's return to "
           "the optimal one; uniform counts as F = 0)" if key == "progress" else "")
        + (", median over the other conditions at each point" if several else "")
        + ("" if grid else "; a search varies several parameters at once, so the points are "
           "not joined")
        + ". The y axis is logarithmic: equal distances are equal factors."))


def horizon_figure(data: StudyData) -> Figure:
    """Variance against the horizon."""
    return _against(data, "horizon", "horizon H (steps)", "horizon", "horizon",
                    "Variance against the horizon")


def discount_figure(data: StudyData) -> Figure:
    """Variance against the discount."""
    return _against(data, "gamma", "discount γ", "discount γ", "gamma", "Variance against the discount")


def progress_figure(data: StudyData) -> Figure:
    """Variance along policy training (policies trained:fraction=F; uniform is F = 0)."""
    return _against(data, "progress", "training progress F", "training progress", "progress",
                    "Variance along policy training")


def batch_figure(data: StudyData) -> Figure:
    """Accuracy against batch size: relative MSE and cosine to ∇J of the mean of B trajectories."""
    title = "Accuracy against batch size"
    b = data.batch
    if b.empty or b["B"].nunique() < 2:
        return Figure("batch", title, "", note=(
            "Left out: the runs hold these metrics at fewer than two batch sizes "
            "(too few trajectories for larger blocks)."))
    names = [n for n in data.estimator_names if n in set(b["estimator"])]
    style = _style(data.estimator_names)
    envs = sorted(b["env"].unique())
    med = b.groupby(["env", "estimator", "B"])[["rel_mse", "cosine"]].median().reset_index()
    fig, axes = plt.subplots(2, len(envs), figsize=(WIDTH, 4.4 + _legend_height(len(names))),
                             squeeze=False, sharex=True, layout="constrained")
    for j, env in enumerate(envs):
        sub = med[med["env"] == env]
        for n in names:
            line = sub[sub["estimator"] == n].sort_values("B")
            colour, marker = style[n]
            for i, metric in enumerate(("rel_mse", "cosine")):
                axes[i][j].plot(line["B"], line[metric], marker=marker, color=colour, ms=3, lw=1)
        axes[0][j].set_title(_wrap(env))
        axes[0][j].set_yscale("log")
        axes[1][j].set_xscale("log")
        axes[1][j].set_ylim(min(-0.05, float(sub["cosine"].min()) - 0.05), 1.02)
        axes[1][j].set_xlabel("batch size B (trajectories, log)")
    axes[0][0].set_ylabel("relative MSE\n|ĝ_B − ∇J|² / |∇J|² (log)")
    axes[1][0].set_ylabel("cosine(ĝ_B, ∇J)")
    for ax in axes[0]:
        ax.axhline(0.1, color="grey", lw=0.8, ls="--")
    handles = [plt.Line2D([], [], color=style[n][0], marker=style[n][1], ms=4, lw=1) for n in names]
    _legend_below(fig, handles, names, "estimator", ncol=3)
    several = data.conditions.groupby("env").size().max() > 1
    return Figure("batch", title, png=_png(fig), caption=(
        "ĝ_B is the mean of B trajectories' estimates. Top: relative mean squared error (the "
        "dashed line is 0.1); bottom: cosine between ĝ_B and the exact gradient (1 = same "
        "direction)" + (", median over the conditions of each environment" if several else "")
        + ". An unbiased estimator's relative MSE falls like 1/B; a biased one levels off at its "
        "squared relative bias."))


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
    taken = []
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
        taken.append(best[2])


def _gae_points(data: StudyData) -> pd.DataFrame:
    """GAE variants with their lambda and critic family (from the estimator registry)."""
    rows = []
    for name in data.estimator_names:
        try:
            params = estimators.get(name).params
        except Exception:  # a name the installed registry no longer knows
            continue
        if "lam" in params:
            family = params.get("critic", "exact")
            if params.get("sigma"):
                family += f", σ={params['sigma']:g}"
            rows.append({"estimator": name, "lam": float(params["lam"]), "family": family})
    return pd.DataFrame(rows, columns=["estimator", "lam", "family"])


def _front(points: pd.DataFrame) -> pd.DataFrame:
    """Points not dominated in (variance, rel_sq_bias), both minimised, sorted by variance."""
    pts = points.sort_values(["variance", "rel_sq_bias"])
    keep, best = [], math.inf
    for _, r in pts.iterrows():
        if r["rel_sq_bias"] < best:
            keep.append(r)
            best = r["rel_sq_bias"]
    return pd.DataFrame(keep)


def gae_figure(data: StudyData) -> Figure:
    """GAE: the bias-variance Pareto front over λ, per critic, from the registry's GAE params."""
    title = "GAE: the bias-variance Pareto front over λ"
    gae = _gae_points(data)
    families = gae.groupby("family")["lam"].nunique() if not gae.empty else pd.Series(dtype=int)
    families = sorted(families[families > 1].index)
    if not families:
        return Figure("gae", title, note=(
            "Left out: the study has no GAE variants with different λ for the same critic."))
    est = data.estimators.merge(gae[gae["family"].isin(families)], on="estimator")
    pts = est.groupby(["env", "family", "lam"])[["variance", "rel_sq_bias"]].median().reset_index()
    pts["shown"] = pts["rel_sq_bias"].clip(lower=0.0)
    positive = pts.loc[pts["shown"] > 0, "shown"]
    lin = float(10 ** math.floor(math.log10(positive.min()))) if len(positive) else 1e-4
    envs = sorted(pts["env"].unique())
    fig, axes = _grid(len(envs), 3.0 if len(envs) > 1 else 3.6, max_cols=3,
                      width=WIDTH if len(envs) > 1 else WIDTH * 0.75)
    norm = Normalize(0.0, 1.0)
    fam_marker = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}
    labels = []
    panel_env = dict(zip(axes, envs, strict=True))
    for ax, env in panel_env.items():
        sub = pts[pts["env"] == env]
        for fam in families:
            f = sub[sub["family"] == fam]
            ax.scatter(f["variance"], f["shown"], c=f["lam"], cmap="viridis", norm=norm,
                       marker=fam_marker[fam], s=28, edgecolors="black", linewidths=0.4, zorder=3)
            front = _front(f.assign(rel_sq_bias=f["shown"]))
            ax.plot(front["variance"], front["shown"], color="black", lw=0.8, zorder=2)
            labelled = f if len(f) <= 6 else front  # many points: label the front only
            labels.append((ax, labelled[["variance", "shown"]].to_numpy().tolist(),
                           [f"λ={lam:.2g}" for lam in labelled["lam"]]))
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=lin, linscale=0.5)
        ax.set_ylim(-lin, max(float(sub["shown"].max()) * 4, lin * 2))
        ax.set_yticks([t for t in ax.get_yticks() if t >= 0])  # nothing below 0 is drawn
        ax.margins(x=0.2)
        _no_minor_labels(ax)
        ax.set_title(_wrap(env))
        ax.set_xlabel("variance per trajectory (log)")
    axes[0].set_ylabel("relative squared bias\n(debiased; negative shown as 0)")
    sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
    cbar = fig.colorbar(sm, ax=axes, fraction=0.05, pad=0.02, aspect=25)
    cbar.set_label("λ", rotation=0, labelpad=6)
    handles = [plt.Line2D([], [], ls="", marker=fam_marker[f], color="lightgrey", mec="black", ms=5)
               for f in families]
    _legend_below(fig, handles, [f"critic: {f}" for f in families], "GAE family",
                  ncol=min(3, len(families)))
    fig.canvas.draw()  # fixes the layout, so that labels can be placed where they fit
    for ax in axes:  # all labels of a panel at once, so that they avoid each other
        xy = [p for a, q, _ in labels if a is ax for p in q]
        dots = pts.loc[pts["env"] == panel_env[ax], ["variance", "shown"]].to_numpy().tolist()
        _place_labels(ax, xy, [t for a, _, ts in labels if a is ax for t in ts], dots)
    several = est.groupby(["env", "family", "lam"]).size().max() > 1
    return Figure("gae", title, png=_png(fig), caption=(
        "Each point is a GAE variant, coloured by λ; the black line joins the variants that no "
        "other variant with the same critic beats in both variance and squared bias (the Pareto "
        "front), labelled by λ" + (" (medians over the conditions of each environment)" if several
        else "") + f". Down and left is better. The y axis is linear below {lin:g} and "
        "logarithmic above; a debiased squared bias below 0 (bias under the noise floor) is "
        "drawn at 0."))


def optuna_figures(data: StudyData) -> list[Figure]:
    """Optuna's own plots for search studies, from the storage named by the invocation runs."""
    inv = data.invocations
    title = "Optuna search"
    if data.sampler == "grid":
        return [Figure("optuna", title, note=(
            "Not applicable: a grid study runs every condition; there is no search to plot."))]
    storage = inv["tag:optuna_storage"].dropna().iloc[-1] if "tag:optuna_storage" in inv else None
    study, why = _open_optuna(data.name, storage)
    if study is None:
        return [Figure("optuna", title, "", note=f"Left out: {why}")]
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
        if store.kind == "sqlite" and not store.path.is_file():
            return None, f"the Optuna storage {shown} cannot be opened (no such file)."
        check_reachable(store)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=name, storage=url), None
    except Exception as exc:
        return None, f"the Optuna storage {shown} cannot be opened ({type(exc).__name__})."


FIGURES = (bias_figure, ratio_heatmap, horizon_figure, discount_figure, progress_figure,
           batch_figure, gae_figure)


def make_figures(data: StudyData) -> list[Figure]:
    """Every figure of the report, in order (left-out ones carry a note instead of a PNG)."""
    out = []
    with sns.axes_style("whitegrid"), plt.rc_context(RC):
        for make in FIGURES:
            before = set(plt.get_fignums())
            try:
                out.append(make(data))
            except Exception as exc:  # one figure the data cannot make must not cost the report
                _close_new(before)
                title = (make.__doc__ or make.__name__).strip().splitlines()[0].rstrip(".")
                out.append(Figure(make.__name__, title, note=f"Left out: it could not be drawn "
                                                             f"({_why(exc)})."))
        out.extend(optuna_figures(data))
    return out
