"""MLflow runs of one study -> tidy pandas DataFrames. Nothing here looks at in-memory state.

A study is one MLflow experiment (see ``suite.harness.study``): invocation runs, condition runs under them
and estimator runs that name their condition run (tag ``condition_run``; runs logged before that
tag existed were nested under it). Only FINISHED condition runs count; when the same condition was
run more than once, the latest FINISHED run wins, and only its estimator runs are kept.
"""

from __future__ import annotations

import ast
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import estimators
from suite.core.errors import InputError
from suite.harness.stores import TRACKING_SCHEMES, check_reachable, mask, parse_store_url
from suite.harness.study_spec import CONDITION_KEYS, check_study_name, load_study
from suite.harness.tracking import tracking_uri

__all__ = ["METRICS", "StudyData", "estimator_order", "load_runs", "study_name", "summarize",
           "training_fraction"]

# MLflow metric key of an estimator run -> column of StudyData.estimators
METRICS = {
    "bias/rel": "rel_bias", "bias/rel_ci_low": "rel_bias_lo", "bias/rel_ci_high": "rel_bias_hi",
    "bias/rel_plugin": "rel_bias_plugin", "bias/rel_noise_floor": "noise_floor",
    "bias/rel_sq_debiased": "rel_sq_bias",
    "variance/trajectory": "variance", "variance/trajectory_ci_low": "variance_lo",
    "variance/trajectory_ci_high": "variance_hi", "variance/batch": "batch_variance",
    "variance/noise_to_signal": "noise_to_signal",
    "variance/ratio_vs_reinforce": "var_ratio", "variance/ratio_vs_reinforce_ci_low": "var_ratio_lo",
    "variance/ratio_vs_reinforce_ci_high": "var_ratio_hi",
    "test/p_value": "p_value", "test/statistic": "test_statistic", "test/rejects_unbiased": "rejects",
    "samples/batch_size_for_rel_mse_0.1": "batch_for_mse_0.1",
    "samples/batch_size_for_rel_mse_0.01": "batch_for_mse_0.01",
}
_BATCH = re.compile(r"^batch/(rel_mse|cosine|sign_agreement)_at_(\d+)$")
_NUMERIC_KEYS = ("gamma", "horizon", "trajectories", "batch_size")


@dataclass
class StudyData:
    """Everything a report shows, as read from MLflow."""

    name: str
    uri: str  # the tracking URI, password masked
    experiment_id: str
    invocations: pd.DataFrame  # one row per invocation run (tags and params as columns)
    conditions: pd.DataFrame  # one row per kept condition run
    estimators: pd.DataFrame  # one row per estimator run of a kept condition, condition columns merged
    batch: pd.DataFrame  # long: condition_run, estimator, B, rel_mse, cosine, sign_agreement
    free_params: list[str]  # columns "free:NAME" of searched parameters that are not condition keys
    varying: list[str]  # condition keys and free parameters with more than one value
    skipped: dict[str, int] = field(default_factory=dict)  # runs left out, by reason
    study_files: dict[str, str] = field(default_factory=dict)  # sha256 -> study file text

    @property
    def sampler(self) -> str:
        """The Optuna sampler of the latest invocation (grid, tpe, nsga2, ...)."""
        col = self.invocations.get("tag:sampler")
        return str(col.dropna().iloc[-1]) if col is not None and col.notna().any() else "grid"

    @property
    def envs(self) -> list[str]:
        return sorted(self.conditions["env"].unique())

    @property
    def estimator_names(self) -> list[str]:
        return estimator_order(self.estimators["estimator"].unique())


def study_name(arg: str) -> str:
    """The study (experiment) name: from a study file when ``arg`` is a path, else ``arg`` itself."""
    if arg.endswith(".toml") or Path(arg).exists():
        return load_study(arg).name  # InputError when the file is missing or invalid
    check_study_name(arg)  # the name becomes a folder under results/
    return arg


def training_fraction(policy: str) -> float:
    """'trained:fraction=0.25' -> 0.25; 'uniform' -> 0 (the start of training); others NaN."""
    if policy == "uniform":
        return 0.0
    m = re.fullmatch(r"trained:fraction=([0-9.eE+-]+)", policy.strip())
    return float(m.group(1)) if m else math.nan


def _natural(name: str) -> tuple:
    return tuple(float(p) if re.fullmatch(r"\d+\.?\d*", p) else p
                 for p in re.split(r"(\d+\.?\d*)", name) if p)


def estimator_order(names) -> list[str]:
    """Registry order first (reinforce leads), then other names (GAE specs) in natural order."""
    index = {n: i for i, n in enumerate(estimators.names())}
    return sorted(set(names), key=lambda n: (index.get(n, len(index)), _natural(n)))


def _value(text: str):
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return v if isinstance(v, int | float | bool) else text


def _count(seeds) -> int:
    """Number of seeds from the logged parameter ('[0, 1]'); 1 when it cannot be read."""
    try:
        value = ast.literal_eval(seeds)
    except (ValueError, SyntaxError, TypeError):
        return 1
    return len(value) if isinstance(value, list | tuple) else 1


def _check_store(uri: str) -> None:
    """Refuse a SQLite store that does not exist (MLflow would create an empty one), and fail in
    one line within seconds when a server does not answer (the password masked)."""
    store = parse_store_url(uri, "MLflow tracking URI", TRACKING_SCHEMES)
    if store.kind == "sqlite" and not store.path.is_file():
        raise InputError(f"no MLflow store at {uri} (file {store.path} does not exist); set "
                         "MLFLOW_TRACKING_URI to the store the study logged to")
    check_reachable(store)


def _search(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=10_000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _frame(runs: list) -> pd.DataFrame:
    rows = []
    for r in runs:
        row = {"run_id": r.info.run_id, "status": r.info.status,
               "start": pd.Timestamp(r.info.start_time or 0, unit="ms", tz="UTC"),
               "end": (pd.Timestamp(r.info.end_time, unit="ms", tz="UTC")
                       if r.info.end_time else pd.NaT),
               "parent": r.data.tags.get("mlflow.parentRunId"), "name": r.info.run_name}
        row.update({f"tag:{k}": v for k, v in r.data.tags.items() if not k.startswith("mlflow.")})
        row.update({f"param:{k}": v for k, v in r.data.params.items()})
        row.update({f"metric:{k}": v for k, v in r.data.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _conditions(runs: pd.DataFrame, skipped: dict[str, int]) -> tuple[pd.DataFrame, list[str]]:
    cond = runs[runs["tag:kind"] == "condition"]
    skipped["condition runs not FINISHED"] = int((cond["status"] != "FINISHED").sum())
    cond = cond[cond["status"] == "FINISHED"]
    params = sorted(c[6:] for c in cond.columns if c.startswith("param:") and cond[c].notna().any())
    free = [f"free:{p}" for p in params if p not in CONDITION_KEYS and p not in ("seeds", "n_params")]
    out = pd.DataFrame({"condition_run": cond["run_id"], "invocation_run": cond["parent"],
                        "trial": pd.to_numeric(cond.get("tag:trial"), errors="coerce"),
                        "start": cond["start"]})
    for key in (*CONDITION_KEYS, *free, "seeds", "n_params"):
        out[key] = cond.get(f"param:{key.removeprefix('free:')}")
    for key in (*_NUMERIC_KEYS, "n_params"):
        out[key] = pd.to_numeric(out[key], errors="coerce")
    for key in free:
        out[key] = out[key].map(lambda v: _value(v) if isinstance(v, str) else v)
    out["J"] = cond.get("metric:exact/J")
    out["grad_norm"] = cond.get("metric:exact/grad_norm")
    out["seconds"] = cond.get("metric:run/seconds")
    out["n_seeds"] = out["seeds"].map(_count)
    # a re-run of the same condition: keep the latest FINISHED run
    ident = [*CONDITION_KEYS, *free]
    out = out.sort_values("start")
    before = len(out)
    out = out.drop_duplicates(subset=ident, keep="last")
    skipped["superseded condition runs (re-runs)"] = before - len(out)
    out["progress"] = out["policy"].map(training_fraction)
    return out.sort_values([*ident]).reset_index(drop=True), free


def _label(row: pd.Series, varying: list[str]) -> str:
    """A short name of a condition from the keys that vary (env excluded: tables group by it)."""
    parts = []
    templated = any(k.startswith("free:") for k in varying)
    for key in varying:
        if key == "env" or (templated and key == "policy"):  # env: grouped by; a templated
            continue  # policy repeats the free parameters that fill it
        v = row[key]
        short = {"gamma": "γ", "horizon": "H", "trajectories": "N", "batch_size": "B"}
        if key in short:
            parts.append(f"{short[key]}={v:.3g}")
        elif key == "policy":
            parts.append(str(v))
        else:
            name = key.removeprefix("free:")
            parts.append(f"{name}={v:.3g}" if isinstance(v, float) else f"{name}={v}")
    return ", ".join(parts) or "the condition"


def _estimators(runs: pd.DataFrame, cond: pd.DataFrame, skipped: dict[str, int]) -> pd.DataFrame:
    est = runs[runs["tag:kind"] == "estimator"]
    of = est["tag:condition_run"].fillna(est["parent"]) if "tag:condition_run" in est else est["parent"]
    kept = est[(est["status"] == "FINISHED") & of.isin(cond["condition_run"])]
    skipped["estimator runs not FINISHED or of a left-out condition"] = len(est) - len(kept)
    out = pd.DataFrame({"estimator_run": kept["run_id"], "condition_run": of[kept.index],
                        "estimator": kept["param:estimator"],
                        "claims_unbiased": kept["param:claims_unbiased"].map(lambda s: s == "True")})
    for key, col in METRICS.items():  # a metric no run logged is a column of NaN
        out[col] = (pd.to_numeric(kept[f"metric:{key}"], errors="coerce")
                    if f"metric:{key}" in kept else np.nan)
    out["rejects"] = out["rejects"].map(lambda v: None if pd.isna(v) else bool(v))
    out["agrees"] = [None if r is None else r != c
                     for r, c in zip(out["rejects"], out["claims_unbiased"], strict=True)]
    # MLflow keeps finite metrics only: a missing batch size means the squared bias alone
    # exceeds the target (infinite), unless the relative metrics are undefined (grad J = 0)
    for target in ("0.1", "0.01"):
        col = f"batch_for_mse_{target}"
        unreachable = out[col].isna() & (out["rel_sq_bias"] >= float(target))
        out.loc[unreachable, col] = np.inf
    out = out.merge(cond, on="condition_run", how="inner", validate="many_to_one")
    order = {n: i for i, n in enumerate(estimator_order(out["estimator"].unique()))}
    out["order"] = out["estimator"].map(order)
    return out.sort_values(["env", "order", "label"]).reset_index(drop=True)


def _batch(runs: pd.DataFrame, est: pd.DataFrame) -> pd.DataFrame:
    cols = {c: _BATCH.match(c[7:]) for c in runs.columns if c.startswith("metric:batch/")}
    sub = runs.set_index("run_id").loc[est["estimator_run"], list(cols)]
    rows = []
    for run_id, values in sub.iterrows():
        for col, m in cols.items():
            if pd.notna(values[col]):
                rows.append({"estimator_run": run_id, "metric": m.group(1), "B": int(m.group(2)),
                             "value": float(values[col])})
    if not rows:
        return pd.DataFrame(columns=["estimator_run", "B", "rel_mse", "cosine", "sign_agreement"])
    long = pd.DataFrame(rows).pivot_table(index=["estimator_run", "B"], columns="metric",
                                          values="value").reset_index()
    keep = ["estimator_run", "condition_run", "estimator", "env", "label", "order"]
    return long.merge(est[keep], on="estimator_run").sort_values(["env", "order", "B"])


def _study_files(client, invocations: pd.DataFrame) -> dict[str, str]:
    """Study file text per SHA-256, from the invocation runs' artifacts (latest first)."""
    import os

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bar on stderr
    out: dict[str, str] = {}
    for _, inv in invocations.sort_values("start", ascending=False).iterrows():
        sha = inv.get("tag:study_sha256") or "unknown"
        if sha in out:
            continue
        try:
            names = [a.path for a in client.list_artifacts(inv["run_id"]) if a.path.endswith(".toml")]
            if names:
                with tempfile.TemporaryDirectory() as tmp:
                    local = client.download_artifacts(inv["run_id"], names[0], tmp)
                    out[sha] = Path(local).read_text()
        except Exception:  # an unreachable artifact store: provenance shows the hash only
            continue
    return out


def load_runs(study: str, uri: str | None = None) -> StudyData:
    """Read the study's experiment from the tracking store (``MLFLOW_TRACKING_URI``)."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    _check_store(uri)
    client = MlflowClient(tracking_uri=uri)
    shown = mask(uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise InputError(f"no MLflow experiment named '{study}' in {shown}; known studies: "
                         f"{', '.join(known) or 'none'} (run `python -m suite study FILE` first)")
    runs = _frame(_search(client, exp.experiment_id))
    if runs.empty or "tag:kind" not in runs:
        raise InputError(f"MLflow experiment '{study}' in {shown} has no study runs")
    skipped: dict[str, int] = {}
    cond, free = _conditions(runs, skipped)
    if cond.empty:
        raise InputError(f"MLflow experiment '{study}' in {shown} has no FINISHED condition runs; "
                         "run or resume the study first")
    varying = [k for k in (*CONDITION_KEYS, *free) if cond[k].nunique(dropna=False) > 1]
    cond["label"] = [_label(row, varying) for _, row in cond.iterrows()]
    est = _estimators(runs, cond, skipped)
    if est.empty:
        raise InputError(f"MLflow experiment '{study}' in {shown} has no FINISHED estimator runs")
    invocations = runs[runs["tag:kind"] == "invocation"].sort_values("start").reset_index(drop=True)
    return StudyData(name=study, uri=shown, experiment_id=exp.experiment_id, invocations=invocations,
                     conditions=cond, estimators=est, batch=_batch(runs, est), free_params=free,
                     varying=varying, skipped=skipped, study_files=_study_files(client, invocations))


def summarize(data: StudyData) -> pd.DataFrame:
    """One row per environment and estimator: medians (and ranges) over the conditions, counts of
    test verdicts; the intervals of the single condition when there is only one."""
    rows = []
    for (env, name), g in data.estimators.groupby(["env", "estimator"], sort=False):
        one = g.iloc[0] if len(g) == 1 else None
        rows.append({
            "env": env, "estimator": name, "n": len(g), "order": g["order"].iloc[0],
            "claims_all": bool(g["claims_unbiased"].all()),
            "claims_any": bool(g["claims_unbiased"].any()),
            "claims_biased": int((~g["claims_unbiased"]).sum()),
            "rejects": int(g["rejects"].fillna(False).astype(bool).sum()),
            "agrees": int(g["agrees"].fillna(False).astype(bool).sum()),
            "tested": int(g["rejects"].notna().sum()),
            "p_value": one["p_value"] if one is not None else math.nan,
            **{f"{m}_{stat}": getattr(g[m], stat)() for m in ("rel_bias", "var_ratio")
               for stat in ("median", "min", "max")},
            **{f"{m}_{end}": (one[f"{m}_{end}"] if one is not None else math.nan)
               for m in ("rel_bias", "var_ratio") for end in ("lo", "hi")},
            "noise_to_signal": g["noise_to_signal"].median(),
            "batch_for_mse_0.1": g["batch_for_mse_0.1"].median(),
        })
    return pd.DataFrame(rows).sort_values(["env", "order"]).reset_index(drop=True)
