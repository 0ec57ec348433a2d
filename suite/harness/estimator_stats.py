"""One estimator's statistics on one condition, as the stages pass them on: measure and the study
build them, the command line prints them, MLflow and stats.json record ``to_json()``.

They join the estimator's claim, its sampled statistics (``suite.core.stats.Summary``; none when
the condition samples no trajectories), its exact block (``ExactRow``) and the agreement of the
two. ``to_json`` is the estimator's row of stats.json, the dict that the metric table
(``suite.core.metrics.METRICS``) reads, and two statistics are equal when their rows are.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.metrics import verdict
from ..core.stats import Summary
from .exact_table import Agreement, ExactRow

__all__ = ["EstimatorStats"]


@dataclass(frozen=True, eq=False)
class EstimatorStats:
    claims_unbiased: bool  # the estimator's claim at this condition's discount
    condition: str  # the claim's condition, in words
    exact: ExactRow  # exact moments and metrics, or why there are none
    sampled: Summary | None = None  # None: no trajectories sampled (exact moments only)
    agreement: Agreement | None = None  # None: nothing to compare (no exact moments or samples)
    n_seeds: int | None = None  # the seeds pooled into ``sampled`` (a study's aggregate)

    @property
    def rejects_unbiased(self) -> bool | None:
        """The sampled test's verdict on 'mean = grad J' (None: inconclusive or not sampled)."""
        return None if self.sampled is None else self.sampled.rejects_unbiased

    def verdict(self) -> tuple[str, str]:
        """(verdict, source): from the exact relative bias where there is one, else the test."""
        return verdict(self.exact.get("rel_bias"), self.rejects_unbiased)

    def to_json(self) -> dict[str, object]:
        """The estimator's row of stats.json."""
        exact = self.exact.to_json()
        agreement = {} if self.agreement is None else self.agreement.to_json()
        if self.sampled is None:
            return {"claims_unbiased": self.claims_unbiased, "condition": self.condition,
                    "rejects_unbiased": None, "exact": exact, "agreement": agreement}
        row = self.sampled.to_json()
        row.update({"claims_unbiased": self.claims_unbiased, "condition": self.condition,
                    "exact": exact, "agreement": agreement})
        if self.n_seeds is not None:
            row["n_seeds"] = self.n_seeds
            row["ci_resamples"] = ("groups of batches" if self.n_seeds == 1
                                   else f"groups of batches, {self.n_seeds} seeds pooled")
        return row

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EstimatorStats) and self.to_json() == other.to_json()
