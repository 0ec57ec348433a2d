"""Every metric, defined once: its name, where it lives in stats.json, its MLflow key, which way
is better, whether it is exact or sampled, and one line of definition.

The statistics (suite.core.stats, suite.core.moments), the MLflow logging, study objectives, the
command line, the reports and docs/metrics.md all read this table; a test fails when a key
appears anywhere that the table does not define.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["EXACT_TOL", "METRICS", "ROW_FIELDS", "Metric", "by_mlflow", "by_name", "flatten",
           "markdown_table", "verdict"]


@dataclass(frozen=True)
class Metric:
    name: str  # unique: the name studies (objectives), reports and docs use
    mlflow: str  # MLflow metric key (an interval adds _ci_low and _ci_high)
    source: str  # "sampled" | "exact" | "agreement" (sampled against exact)
    definition: str  # one line (docs/metrics.md has the details)
    direction: str | None = None  # "minimize" | "maximize" when smaller / larger is better
    interval: bool = False  # has a [low, high] interval under KEY_ci
    per_batch_size: bool = False  # one value per batch size B' (MLflow key gets _at_B')

    @property
    def block(self) -> str | None:
        """Where it lives in a stats.json estimator row: None (the row itself), "exact",
        "agreement" or "at_batch_size" (a dict per batch size B')."""
        if self.source == "sampled":
            return "at_batch_size" if self.per_batch_size else None
        return self.source

    @property
    def key(self) -> str:
        """Its key inside that block."""
        if self.name == "batch_cosine":
            return "cosine"
        return self.name.removeprefix("exact_").removeprefix("agreement_")

    def read(self, row: dict):
        """Its value in a stats.json estimator row (a dict {B': value} when per batch size),
        or None when the row does not have it."""
        if self.block is None:
            return row.get(self.key)
        block = row.get(self.block) or {}
        if self.block == "at_batch_size":
            return {int(b): at[self.key] for b, at in block.items() if self.key in at} or None
        if self.per_batch_size:  # exact: rel_mse_at_batch_size
            return {int(b): v for b, v in (block.get(f"{self.key}_at_batch_size") or {}).items()}
        return block.get(self.key)

    def read_interval(self, row: dict) -> list | None:
        block = row if self.block is None else (row.get(self.block) or {})
        return block.get(f"{self.key}_ci")


_S, _E, _A = "sampled", "exact", "agreement"
METRICS: tuple[Metric, ...] = (
    # sampled, per estimator (stats.json row; suite.core.stats.summarize)
    Metric("rel_bias", "bias/rel", _S, "sqrt(max(0, |mean - g|^2 - tr Cov(g_B)/M)) / |g|: "
           "relative bias with the noise's share removed", "minimize", interval=True),
    Metric("rel_bias_plugin", "bias/rel_plugin", _S, "|mean - g| / |g|, not debiased", "minimize"),
    Metric("rel_bias_noise_floor", "bias/rel_noise_floor", _S,
           "sqrt(tr Cov(g_B) / M) / |g|: what rel_bias_plugin shows for an unbiased estimator"),
    Metric("rel_sq_bias_debiased", "bias/rel_sq_debiased", _S,
           "(|mean - g|^2 - tr Cov(g_B)/M) / |g|^2 (can be slightly negative)", "minimize"),
    Metric("scale", "bias/scale", _S, "u . mean / |g|, u = g/|g|: the mean's component along "
           "grad J relative to |grad J| (1 when unbiased)", interval=True),
    Metric("cosine", "bias/cosine", _S, "cos(mean, g)", "maximize"),
    Metric("norm_ratio", "bias/norm_ratio", _S, "|mean| / |g|"),
    Metric("variance", "variance/trajectory", _S, "tr Cov(X): per-trajectory variance",
           "minimize", interval=True),
    Metric("batch_variance", "variance/batch", _S, "tr Cov(g_B): variance of the batch estimate",
           "minimize", interval=True),
    Metric("noise_to_signal", "variance/noise_to_signal", _S, "tr Cov(X) / |g|^2", "minimize"),
    Metric("variance_ratio", "variance/ratio_vs_reinforce", _S,
           "tr Cov(X) / tr Cov(X_reinforce) on the same trajectories", "minimize", interval=True),
    Metric("batch_variance_ratio", "variance/batch_ratio_vs_reinforce", _S,
           "tr Cov(g_B) / tr Cov(g_B of reinforce) on the same trajectories", "minimize"),
    Metric("p_value", "test/p_value", _S, "t-test of 'mean = grad J' along grad J (None: "
           "inconclusive)", "maximize"),
    Metric("test_statistic", "test/statistic", _S, "t of that test"),
    Metric("rejects_unbiased", "test/rejects_unbiased", _S, "p_value < alpha"),
    Metric("alpha", "test/alpha", _S, "the test's level"),
    Metric("test_inconclusive", "test/inconclusive", _S,
           "1 when the test cannot hold its level at this sample size (p_value is then None)"),
    Metric("test_level_error", "test/level_error", _S,
           "predicted error of the test's level from the batch estimates' skewness and kurtosis"),
    Metric("trajectories_needed", "test/trajectories_needed", _S,
           "trajectories at which an inconclusive test would hold its level"),
    Metric("batch_size_for_rel_mse_0.1", "samples/batch_size_for_rel_mse_0.1", _S,
           "batch size at which the relative MSE reaches 0.1", "minimize"),
    Metric("batch_size_for_rel_mse_0.01", "samples/batch_size_for_rel_mse_0.01", _S,
           "batch size at which the relative MSE reaches 0.01", "minimize"),
    Metric("rel_mse", "batch/rel_mse", _S, "mean |g_B' - g|^2 / |g|^2 over blocks of B'",
           "minimize", per_batch_size=True),
    Metric("sign_agreement", "batch/sign_agreement", _S, "fraction of blocks with g_B' . g > 0",
           "maximize", per_batch_size=True),
    Metric("batch_cosine", "batch/cosine", _S, "mean cos(g_B', g) over blocks of B'", "maximize",
           per_batch_size=True),
    # exact (the exact block; suite.core.moments, by recursion)
    Metric("exact_rel_bias", "exact/rel_bias", _E, "|E g_B - g| / |g|", "minimize"),
    Metric("exact_cosine", "exact/cosine", _E, "cos(E g_B, g)", "maximize"),
    Metric("exact_norm_ratio", "exact/norm_ratio", _E, "|E g_B| / |g|"),
    Metric("exact_mean_norm", "exact/mean_norm", _E, "|E g_B|"),
    Metric("exact_second_moment", "exact/second_moment", _E, "E|g|^2 of one trajectory"),
    Metric("exact_variance", "exact/variance", _E, "tr Cov of one trajectory's estimate",
           "minimize"),
    Metric("exact_batch_variance", "exact/batch_variance", _E, "tr Cov of the batch estimate",
           "minimize"),
    Metric("exact_noise_to_signal", "exact/noise_to_signal", _E, "variance / |g|^2", "minimize"),
    Metric("exact_variance_ratio", "exact/variance_ratio", _E, "variance / reinforce's",
           "minimize"),
    Metric("exact_rel_mse", "exact/rel_mse", _E, "|bias|^2/|g|^2 + batch variance/|g|^2",
           "minimize", per_batch_size=True),
    Metric("exact_batch_size_for_rel_mse_0.1", "exact/batch_size_for_rel_mse_0.1", _E,
           "batch size for a relative MSE of 0.1", "minimize"),
    Metric("exact_batch_size_for_rel_mse_0.01", "exact/batch_size_for_rel_mse_0.01", _E,
           "batch size for a relative MSE of 0.01", "minimize"),
    # the sampled statistics against the exact ones
    Metric("agreement_z", "agreement/z", _A, "(sampled - exact mean) along the bias or gradient "
           "direction, in standard errors"),
    Metric("agreement_p_value", "agreement/p_value", _A, "two-sided normal p-value of z"),
    Metric("agreement_variance_ratio", "agreement/variance_ratio", _A,
           "sampled / exact variance", interval=True),
)

# the other fields of a stats.json estimator row: counts, the claim, text, and the blocks
ROW_FIELDS = ("n_trajectories", "batch_size", "n_batches", "n_groups", "grad_norm", "mean_norm",
              "bias_norm", "sq_bias_debiased", "claims_unbiased", "condition", "inconclusive",
              "test_method", "exact", "agreement", "at_batch_size", "n_seeds", "ci_resamples")

_BY_NAME = {m.name: m for m in METRICS}
_BY_MLFLOW = {m.mlflow: m for m in METRICS}
EXACT_TOL = 1e-9  # an exact relative bias below this is float64 round-off: unbiased


def by_name(name: str) -> Metric:
    return _BY_NAME[name]


def by_mlflow(key: str) -> Metric:
    return _BY_MLFLOW[key]


def verdict(exact_rel_bias: float | None, rejects: bool | None) -> tuple[str, str]:
    """(verdict, source): "biased" | "unbiased" | "inconclusive", from the exact relative bias
    when there is one, else from the sampled test (None: inconclusive)."""
    if exact_rel_bias is not None and math.isfinite(exact_rel_bias):
        return ("biased" if exact_rel_bias > EXACT_TOL else "unbiased"), "exact"
    if rejects is None:
        return "inconclusive", "sampled"
    return ("biased" if rejects else "unbiased"), "sampled"


def flatten(row: dict) -> dict[str, float]:
    """The MLflow metrics of one stats.json estimator row: every metric of the table it holds,
    as finite floats (booleans as 0/1), intervals as _ci_low/_ci_high, per batch size as _at_B."""
    out: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)

    for m in METRICS:
        value = m.read(row)
        if m.per_batch_size:
            for b, v in (value or {}).items():
                put(f"{m.mlflow}_at_{b}", v)
        else:
            put(m.mlflow, value)
        if m.interval and (ci := m.read_interval(row)):
            put(f"{m.mlflow}_ci_low", ci[0])
            put(f"{m.mlflow}_ci_high", ci[1])
    return out


def markdown_table() -> str:
    """The table as docs/metrics.md shows it (between its metrics:start/end markers)."""
    lines = ["| metric | stats.json | MLflow key | source | better | definition |",
             "|---|---|---|---|---|---|"]
    for m in METRICS:
        where = {None: "row", "exact": "`exact` block", "agreement": "`agreement` block",
                 "at_batch_size": "`at_batch_size[B']`"}[m.block]
        key = f"`{m.key}`" + (" (+ `_ci`)" if m.interval else "")
        mlflow = f"`{m.mlflow}`" + ("`_at_B'`" if m.per_batch_size else "")
        lines.append(f"| `{m.name}` | {where}: {key} | {mlflow} | {m.source} | "
                     f"{m.direction or ''} | {m.definition.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)
