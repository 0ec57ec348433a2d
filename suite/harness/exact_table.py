"""The exact moments of the chosen estimators for one problem, their metrics, and the agreement
of a sampled measurement with them (the check of the sampler, the estimator code and the engine).

``exact_rows`` runs the exact engine (suite.core.moments) once per estimator; ``agreement``
compares a sampled mean and variance with the exact ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats as st
from torch import Tensor

from ..core.errors import InputError
from ..core.exact import ExactSolution
from ..core.group_moments import RULES, Outcomes, group_moments, outcome_table
from ..core.mdp import MDP
from ..core.moments import ExactMoments, MomentModel, NoExact, exact_moments, project, relative_metrics
from ..core.policies import Policy

__all__ = ["Agreement", "ExactRow", "agreement", "exact_rows"]


@dataclass(frozen=True)
class ExactRow:
    """One estimator's exact moments (or why it has none) and the metrics they give."""

    name: str
    moments: ExactMoments | None  # None: no exact moments (reason says why)
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # relative_metrics, rel_mse at B
    direction: Tensor | None = None  # [P] unit vector the agreement z-score is taken along
    direction_batch_variance: float = math.nan  # Var(direction . g_B), exact
    rel_mse_at: dict[int, float] = field(default_factory=dict)  # batch size k B -> rel. MSE

    @property
    def exact(self) -> bool:
        return self.moments is not None

    def get(self, metric: str) -> float | None:
        """A metric as the ``exact`` block holds it: None when there are no exact moments, or
        when it is undefined (NaN)."""
        return None if self.moments is None else _finite_or_none(self.metrics[metric])

    def to_json(self) -> dict:
        """The ``exact`` block of stats.json / an entry of moments.json."""
        if self.moments is None:
            return {"exact": False, "reason": self.reason}
        return {"exact": True, **{k: _finite_or_none(v) for k, v in self.metrics.items()},
                "rel_mse_at_batch_size": {str(b): _finite_or_none(v)
                                          for b, v in self.rel_mse_at.items()}}


def _finite_or_none(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v


MAX_SHARED_STARTS = 16  # a shared start needs one exact run per start state


def exact_rows(mdp: MDP, policy: Policy, sol: ExactSolution, estimators, batch_size: int,
               factors: tuple[int, ...] = (1,), reference: str = "reinforce",
               directions: bool = True, shared_start: bool = False) -> dict[str, ExactRow]:
    """Exact moments and metrics of every estimator at batch size B (block factors k give the
    relative MSE at k B), and (``directions``) each one's agreement direction, its bias
    direction when it is biased, else the gradient, with the exact variance along it.

    The backward recursions give the estimators that declare a form; the group estimators of
    LLM fine-tuning get theirs by conditioning on the members' outcomes (suite.core.group_moments)
    where the MDP's trajectories can be enumerated. ``shared_start``: the B trajectories of a
    batch share one start state drawn from rho0, so the moments are those given each start,
    averaged with rho0 (one run per start state)."""
    source = _Source(MomentModel(mdp, policy, sol), shared_start)
    moments = {est.name: source.moments(est, batch_size) for est in estimators}
    ref = moments.get(reference)
    ref_var = ref.variance if isinstance(ref, ExactMoments) else None
    g = sol.grad.to(torch.float64)
    rows = {}
    for est in estimators:
        mom = moments[est.name]
        if isinstance(mom, str):
            rows[est.name] = ExactRow(est.name, None, mom)
            continue
        metrics: dict[str, float] = {}
        rel_mse_at: dict[int, float] = {}
        for key, value in relative_metrics(mom, g, ref_var, tuple(factors)).items():
            if isinstance(value, dict):  # rel_mse, by batch size
                rel_mse_at = value
            else:
                metrics[key] = value
        metrics["rel_mse"] = rel_mse_at[batch_size]
        u = _direction(mom.batch_mean, g) if directions else None
        var_u = math.nan
        if u is not None:
            along = _Source(MomentModel(mdp, policy, sol, project(source.model.score, u[:, None])),
                            shared_start, groups=False).moments(est, batch_size)
            var_u, u = (math.nan, None) if isinstance(along, str) else (along.batch_variance, u)
        rows[est.name] = ExactRow(est.name, mom, "", metrics, u, var_u, rel_mse_at)
    return rows


class _Source:
    """Where an estimator's exact moments come from: the backward recursions (per start state
    when the start is shared), or the group engine for the group estimators."""

    def __init__(self, model: MomentModel, shared_start: bool, groups: bool = True):
        self.model, self.shared_start, self.groups = model, shared_start, groups
        self.starts = torch.nonzero(model.rho0 > 0).squeeze(1).tolist()
        self._outcomes: Outcomes | str | None = None

    def moments(self, est, batch_size: int) -> ExactMoments | str:
        """The estimator's ExactMoments, or the reason it has none."""
        form = est.exact_form(self.model)
        base = est.name.split(":")[0]
        if isinstance(form, NoExact):
            if not (self.groups and base in RULES and "agg" in est.params):
                return form.reason
            outcomes = self.outcomes()
            if isinstance(outcomes, str):
                return outcomes
            result = group_moments(outcomes, base, est.params["agg"], batch_size,
                                   self.shared_start)
            return result.reason if isinstance(result, NoExact) else result
        if not self.shared_start:
            return exact_moments(self.model, form, batch_size)
        if len(self.starts) > MAX_SHARED_STARTS:
            return (f"shared start over {len(self.starts)} start states: the batch's moments "
                    f"need one exact run per start state (at most {MAX_SHARED_STARTS} here)")
        parts = []
        for s in self.starts:
            given = self.model.for_start(s)
            parts.append((float(self.model.rho0[s]),
                          exact_moments(given, est.exact_form(given), batch_size)))
        zero = torch.zeros((), dtype=torch.float64)  # sum's start, typed: 0.0 + x = 0 + x
        return ExactMoments(sum((w * m.mean for w, m in parts), zero),
                            sum(w * m.second_moment for w, m in parts), int(batch_size),
                            sum((w * m.batch_mean for w, m in parts), zero),
                            sum(w * m.batch_second_moment for w, m in parts))

    def outcomes(self) -> Outcomes | str:
        """The outcome table of the group engine (every trajectory enumerated), or why not."""
        if self._outcomes is None:
            m = self.model
            try:
                self._outcomes = outcome_table(m.mdp, m.policy, m.sol)
            except InputError as exc:
                self._outcomes = f"group estimator on an MDP whose trajectories cannot all be " \
                                 f"enumerated ({exc})"
        return self._outcomes


def _direction(mean: Tensor, g: Tensor) -> Tensor | None:
    """The unit bias direction when the bias is more than round-off, else the unit gradient."""
    bias = mean - g
    scale = max(float(g.norm()), float(mean.norm()))
    if scale == 0:
        return None
    v = bias if float(bias.norm()) > 1e-9 * scale else (g if float(g.norm()) > 0 else mean)
    return v / v.norm()


@dataclass(frozen=True)
class Agreement:
    """A sampled measurement against the exact moments (the ``agreement`` block of stats.json)."""

    z: float  # the sampled mean's distance from the exact one along a direction, in std. errors
    p_value: float  # two-sided normal p-value of z
    variance_ratio: float  # sampled / exact variance
    variance_ratio_ci: list[float]

    def to_json(self) -> dict[str, object]:
        return {"z": self.z, "p_value": self.p_value, "variance_ratio": self.variance_ratio,
                "variance_ratio_ci": self.variance_ratio_ci}


def agreement(row: ExactRow, sampled_mean: np.ndarray, n_batches: int,
              sampled_variance: float, sampled_variance_ci: list[float]) -> Agreement | None:
    """The sampled statistics against the exact ones: z of the sampled mean along the row's
    direction (Var from the exact batch variance along it, over n_batches batches) with its
    two-sided normal p-value, and the ratio of sampled to exact variance with its interval.
    None without exact moments or a direction."""
    if row.moments is None or row.direction is None:
        return None
    diff = torch.as_tensor(sampled_mean, dtype=torch.float64) - row.moments.batch_mean
    se = math.sqrt(row.direction_batch_variance / n_batches) if row.direction_batch_variance > 0 \
        else 0.0
    proj = float(row.direction @ diff)
    z = proj / se if se > 0 else (0.0 if abs(proj) < 1e-12 else math.copysign(math.inf, proj))
    exact_var = row.moments.variance
    ratio = sampled_variance / exact_var if exact_var > 0 else math.nan
    ratio_ci = [x / exact_var for x in sampled_variance_ci] if exact_var > 0 else [math.nan] * 2
    return Agreement(z, float(2 * st.norm.sf(abs(z))), ratio, ratio_ci)
