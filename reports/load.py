"""MLflow runs of one study -> tidy pandas DataFrames. Nothing here looks at in-memory state.

A study is one MLflow experiment (see ``suite.harness.study``): invocation runs, condition runs under
them and estimator runs that name their condition run (tag ``condition_run``; runs logged before
that tag existed are nested under it). Only FINISHED condition runs count; when the same condition
was run more than once, the latest FINISHED run wins, and only its estimator runs are kept.

Every metric column is named by ``suite.core.metrics.METRICS`` (the metric's name; an interval adds
``NAME_ci_low`` and ``NAME_ci_high``) and read from the MLflow key that table gives: there is no
other mapping. What a metric cannot hold (why an estimator has no exact moments, the test's method,
why a test was inconclusive) comes from the condition run's ``stats.json`` artifact.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import estimators
from suite.core.errors import InputError
from suite.core.metrics import METRICS, by_name
from suite.core.specs import parse_spec
from suite.harness.stores import TRACKING_SCHEMES, check_reachable, mask, parse_store_url
from suite.harness.study_spec import CONDITION_KEYS, check_study_name, load_study
from suite.harness.tracking import tracking_uri

__all__ = ["FAMILIES", "StudyData", "column", "estimator_order", "family", "load_runs",
           "short_names", "study_name", "training_fraction"]

_NUMERIC_KEYS = ("gamma", "horizon", "trajectories", "batch_size")
_NOT_FREE = ("seeds", "n_params", "case", "condition")  # logged params that are no condition
FAMILIES = ("returns", "baselines", "critics", "final formula", "group estimators", "other")
_MODULE_FAMILY = {"returns": "returns", "baselines": "baselines", "critics": "critics",
                  "final_formula": "final formula", "groups": "group estimators"}


def column(name: str) -> str:
    """The column of a metric in ``StudyData.estimators``: its name in METRICS (KeyError when
    the table does not define it; ``NAME_ci_low`` / ``_ci_high`` for its interval ends)."""
    base = name.removesuffix("_ci_low").removesuffix("_ci_high")
    metric = by_name(base)
    if base != name and not metric.interval:
        raise KeyError(f"metric {base!r} has no interval")
    return name


@dataclass
class StudyData:
    """Everything a report shows, as read from MLflow."""

    name: str
    uri: str  # the tracking URI, password masked
    experiment_id: str
    invocations: pd.DataFrame  # one row per invocation run (tags and params as columns)
    conditions: pd.DataFrame  # one row per kept condition run
    estimators: pd.DataFrame  # one row per estimator run of a kept condition, condition columns merged
    batch: pd.DataFrame  # long: estimator_run, B, and the per-batch-size metrics by name
    free_params: list[str]  # columns "free:NAME" of parameters that are not condition keys
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

    @property
    def env_labels(self) -> dict[str, str]:
        """Short names of the environments for figures and narrow columns: the options in
        which environments of one kind differ ('tokens: pass_first=0.1'), else the name."""
        return short_names(self.envs)

    @property
    def per_seed(self) -> bool:
        """Each seed a trial of its own (``seed`` in [space], the calibration study's shape)."""
        return "free:seed" in self.varying


def study_name(arg: str) -> str:
    """The study (experiment) name: from a study file when ``arg`` is a path, else ``arg`` itself."""
    if arg.endswith(".toml") or Path(arg).exists():
        return load_study(arg).name  # InputError when the file is missing or invalid
    check_study_name(arg)  # the name becomes a folder under results/
    return arg


def short_names(envs: list[str]) -> dict[str, str]:
    """env -> a shorter label: specs of one kind (``tokens:...``) by the options that differ."""
    try:
        parsed = {e: parse_spec(e) for e in envs}
    except InputError:
        return {e: e for e in envs}
    out = {}
    for env, (kind, opts) in parsed.items():
        same = [o for e, (k, o) in parsed.items() if k == kind]
        differ = [k for k, v in opts.items() if len(same) > 1 and any(o.get(k) != v for o in same)]
        out[env] = f"{kind}: " + ", ".join(f"{k}={opts[k]}" for k in differ) if differ else env
    return out


def training_fraction(policy: str) -> float:
    """'trained:fraction=0.25' -> 0.25; 'uniform' -> 0 (the start of training); others NaN."""
    if policy == "uniform":
        return 0.0
    m = re.fullmatch(r"trained:fraction=([0-9.eE+-]+)", str(policy).strip())
    return float(m.group(1)) if m else math.nan


def _natural(name: str) -> tuple:
    return tuple((0, float(p), "") if re.fullmatch(r"\d+\.?\d*", p) else (1, 0.0, p)
                 for p in re.split(r"(\d+\.?\d*)", name) if p)


def family(name: str) -> str:
    """The estimator's family: the registry module it is defined in (returns, baselines, critics,
    final formula, group estimators), 'other' for names the installed registry does not know."""
    try:
        fn = estimators.get(name).fn
    except Exception:  # a user's estimator file, or a name the registry no longer has
        return "other"
    fn = getattr(fn, "__wrapped__", fn)
    module = getattr(fn, "__module__", "") or ""
    return _MODULE_FAMILY.get(module.rpartition(".")[2], "other")


def estimator_order(names) -> list[str]:
    """By family, then registry order (reinforce leads), then other names in natural order."""
    index = {n: i for i, n in enumerate(estimators.names())}

    def key(n: str):
        base = n.split(":")[0]
        return (FAMILIES.index(family(n)), index.get(n, index.get(base, len(index))), _natural(n))

    return sorted(set(names), key=key)


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
    if store.kind == "sqlite" and not store.file.is_file():
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
    free = [f"free:{p}" for p in params if p not in CONDITION_KEYS and p not in _NOT_FREE]
    out = pd.DataFrame({"condition_run": cond["run_id"], "invocation_run": cond["parent"],
                        "trial": pd.to_numeric(cond.get("tag:trial"), errors="coerce"),
                        "start": cond["start"]})
    for key in (*CONDITION_KEYS, *free, "seeds", "n_params"):
        out[key] = cond.get(f"param:{key.removeprefix('free:')}")
    out["shared_start"] = out["shared_start"].map(lambda v: str(v) == "True")
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


_SHORT = {"gamma": "γ", "horizon": "H", "trajectories": "N", "batch_size": "B"}


def _label(row: pd.Series, varying: list[str]) -> str:
    """A short name of a condition from the keys that vary (env excluded: tables group by it)."""
    parts = []
    templated = any(k.startswith("free:") for k in varying)
    for key in varying:
        if key == "env" or (templated and key == "policy" and "free:seed" not in varying):
            continue  # env: grouped by; a templated policy repeats the free parameters
        v = row[key]
        if key == "trajectories":
            parts.append("exact only" if v == 0 else f"N={int(v):,}")
        elif key in _SHORT:
            parts.append(f"{_SHORT[key]}={v:.3g}")
        elif key in ("policy", "shared_start"):
            parts.append(str(v) if key == "policy" else ("shared start" if v else "own starts"))
        else:
            name = key.removeprefix("free:")
            parts.append(f"{name}={v:.3g}" if isinstance(v, float) else f"{name}={v}")
    return ", ".join(parts) or "the condition"


def _estimators(runs: pd.DataFrame, cond: pd.DataFrame, skipped: dict[str, int]) -> pd.DataFrame:
    est = runs[runs["tag:kind"] == "estimator"]
    of = (est["tag:condition_run"].fillna(est["parent"]) if "tag:condition_run" in est
          else est["parent"])
    kept = est[(est["status"] == "FINISHED") & of.isin(cond["condition_run"])]
    skipped["estimator runs not FINISHED or of a left-out condition"] = len(est) - len(kept)
    out = pd.DataFrame({"estimator_run": kept["run_id"], "condition_run": of[kept.index],
                        "estimator": kept["param:estimator"],
                        "claims_unbiased": kept["param:claims_unbiased"].map(lambda s: s == "True")})
    for m in METRICS:  # a metric no run logged is a column of NaN
        if m.per_batch_size:
            continue
        keys = {m.name: m.mlflow}
        if m.interval:
            keys.update({f"{m.name}_ci_low": f"{m.mlflow}_ci_low",
                         f"{m.name}_ci_high": f"{m.mlflow}_ci_high"})
        for col, key in keys.items():
            out[col] = (pd.to_numeric(kept[f"metric:{key}"], errors="coerce")
                        if f"metric:{key}" in kept else np.nan)
    out["family"] = out["estimator"].map(family)
    out = out.merge(cond, on="condition_run", how="inner", validate="many_to_one")
    # MLflow keeps finite metrics only: a missing batch size for a relative MSE means the squared
    # bias alone exceeds the target (infinite), unless the relative metrics are undefined
    for target in (0.1, 0.01):
        col = f"batch_size_for_rel_mse_{target:g}"
        unreachable = out[col].isna() & (out["rel_sq_bias_debiased"] >= target)
        out.loc[unreachable, col] = np.inf
        exact = f"exact_{col}"
        unreachable = out[exact].isna() & (out["exact_rel_bias"] ** 2 >= target)
        out.loc[unreachable, exact] = np.inf
    order = {n: i for i, n in enumerate(estimator_order(out["estimator"].unique()))}
    out["order"] = out["estimator"].map(order)
    return out.sort_values(["env", "order", "label"]).reset_index(drop=True)


_PER_B = {m.mlflow: m.name for m in METRICS if m.per_batch_size}
_AT = re.compile(r"^(.*)_at_(\d+)$")


def _batch(runs: pd.DataFrame, est: pd.DataFrame) -> pd.DataFrame:
    """Per-batch-size metrics, long: one row per estimator run and batch size B'."""
    cols = {}
    for c in runs.columns:
        m = _AT.match(c[7:]) if c.startswith("metric:") else None
        if m and m.group(1) in _PER_B:
            cols[c] = (_PER_B[m.group(1)], int(m.group(2)))
    names = sorted({n for n, _ in cols.values()})
    keep = ["estimator_run", "condition_run", "estimator", "env", "label", "order", "batch_size"]
    if not cols:
        return pd.DataFrame(columns=[*keep, "B", *names])
    sub = runs.set_index("run_id").loc[est["estimator_run"], list(cols)]
    long = sub.reset_index().melt(id_vars="run_id", var_name="key").dropna(subset=["value"])
    long["metric"] = long["key"].map(lambda k: cols[k][0])
    long["B"] = long["key"].map(lambda k: cols[k][1])
    wide = long.pivot_table(index=["run_id", "B"], columns="metric", values="value").reset_index()
    wide = wide.rename(columns={"run_id": "estimator_run"})
    for n in names:
        if n not in wide:
            wide[n] = np.nan
    return wide.merge(est[keep], on="estimator_run").sort_values(["env", "order", "B"])


def _at_own_batch_size(est: pd.DataFrame, batch: pd.DataFrame) -> None:
    """Columns rel_mse and exact_rel_mse: the value at the condition's own batch size."""
    for name in ("rel_mse", "exact_rel_mse"):
        col = column(name)
        own = (batch[batch["B"] == batch["batch_size"]].set_index("estimator_run")[col]
               if col in batch else pd.Series(dtype=float))
        est[col] = est["estimator_run"].map(own)


def _download(client, run_id: str, name: str) -> str | None:
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bar on stderr
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(client.download_artifacts(run_id, name, tmp)).read_text()
    except Exception:  # an unreachable artifact store: the report goes on without the text
        return None


def _texts(client, est: pd.DataFrame) -> None:
    """From each condition run's stats.json: why an estimator has no exact moments
    (``no_exact``), the test's method (``test_method``) and why it was inconclusive."""
    found: dict[tuple[str, str], dict] = {}
    for run_id in est["condition_run"].unique():
        text = _download(client, run_id, "stats.json")
        try:
            rows = json.loads(text)["aggregate"] if text else {}
        except (ValueError, KeyError, TypeError):
            rows = {}
        for name, row in rows.items():
            exact = row.get("exact") or {}
            found[(run_id, name)] = {
                "no_exact": "" if exact.get("exact", True) else str(exact.get("reason") or ""),
                "test_method": str(row.get("test_method") or ""),
                "inconclusive_why": str(row.get("inconclusive") or "")}
    for key in ("no_exact", "test_method", "inconclusive_why"):
        est[key] = [found.get((c, n), {}).get(key, "")
                    for c, n in zip(est["condition_run"], est["estimator"], strict=True)]


def _study_files(client, invocations: pd.DataFrame) -> dict[str, str]:
    """Study file text per SHA-256, from the invocation runs' artifacts (latest first)."""
    out: dict[str, str] = {}
    for _, inv in invocations.sort_values("start", ascending=False).iterrows():
        sha = inv.get("tag:study_sha256") or "unknown"
        if sha in out:
            continue
        try:
            names = [a.path for a in client.list_artifacts(inv["run_id"]) if a.path.endswith(".toml")]
        except Exception:  # an unreachable artifact store: provenance shows the hash only
            continue
        text = _download(client, inv["run_id"], names[0]) if names else None
        if text is not None:
            out[sha] = text
    return out


def load_runs(study: str, uri: str | None = None) -> StudyData:
    """Read the study's experiment from the tracking store (``MLFLOW_TRACKING_URI``)."""
    from mlflow.tracking import MlflowClient  # slow to import: only when a report is built

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
    cond["setting"] = [_label(row, [k for k in varying if k != "free:seed"])
                       for _, row in cond.iterrows()]
    est = _estimators(runs, cond, skipped)
    if est.empty:
        raise InputError(f"MLflow experiment '{study}' in {shown} has no FINISHED estimator runs")
    batch = _batch(runs, est)
    _at_own_batch_size(est, batch)
    _texts(client, est)
    invocations = runs[runs["tag:kind"] == "invocation"].sort_values("start").reset_index(drop=True)
    return StudyData(name=study, uri=shown, experiment_id=exp.experiment_id, invocations=invocations,
                     conditions=cond, estimators=est, batch=batch, free_params=free,
                     varying=varying, skipped=skipped, study_files=_study_files(client, invocations))
