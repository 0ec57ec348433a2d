"""Checks of a whole study before anything is written: every condition it can produce must be
valid, so that no store, queue or run is created for a study that would fail in its trials.

A grid study's conditions are all checked. A search samples its conditions later, so each
searched parameter is checked at each of its choices and at both ends of its range (the other
parameters at their first value); the checks that depend on a value (bounds, sizes, names
filled from templates) hold in between when they hold at the ends.
"""

from __future__ import annotations

import inspect
import os

from ..core.errors import InputError
from ..core.exact import check_gamma_horizon
from ..core.limits import check_limit
from ..core.specs import parse_spec
from .plan import chosen_estimators
from .problem import cached_mdp, make_policy
from .study import check_condition_sizes
from .study_spec import Range, StudySpec
from .training import trained_policy

__all__ = ["check_conditions", "check_policy", "points"]


def points(spec: StudySpec) -> list[dict]:
    """The parameter points checked: the whole grid, or each searched value against a base."""
    if spec.sampler == "grid":
        return spec.grid()
    values = {k: (list(v) if isinstance(v, list) else _ends(v)) for k, v in spec.space.items()}
    base = {k: vs[0] for k, vs in values.items()}
    return [base] + [{**base, k: v} for k, vs in values.items() for v in vs[1:]]


def _ends(r: Range) -> list:
    return [int(r.low), int(r.high)] if r.int else [r.low, r.high]


def check_conditions(spec: StudySpec) -> None:
    """Raise InputError (file, condition, rule, value, fix) for the first invalid condition."""
    seen: set[tuple] = set()
    for params in points(spec):
        try:
            cond = spec.condition(params)
            key = tuple(sorted((k, repr(v)) for k, v in cond.items()))
            _check(spec, params, cond, skip_problem=key in seen)
            seen.add(key)
        except InputError as exc:
            where = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise InputError(f"{spec.path}: condition ({where or 'the fixed one'}): {exc}") from None


def _check(spec: StudySpec, params: dict, cond: dict, skip_problem: bool) -> None:
    for key, value in cond.items():
        if isinstance(value, str):
            check_limit("template_chars", len(value), f"{key} after filling its templates "
                                                      "(characters)")
    check_gamma_horizon(cond["gamma"], cond["horizon"])
    for key in ("trajectories", "batch_size", "horizon"):
        if isinstance(cond[key], bool) or not isinstance(cond[key], int):
            raise InputError(f"{key} must be a whole number, got {cond[key]!r}")
    check_condition_sizes(cond, chosen_estimators(spec, params))
    if not skip_problem:
        mdp = cached_mdp(cond["env"])
        check_policy(cond["policy"], mdp, cond["gamma"], cond["horizon"])


def check_policy(spec: str, mdp, gamma: float, horizon: int) -> None:
    """The policy spec is valid for this MDP; a trained policy's options are checked without
    training it (that happens in its trial)."""
    name, options = parse_spec(spec)
    if name != "trained" or spec.endswith(".npy") or os.path.sep in spec:
        make_policy(spec, mdp, gamma, horizon)
        return
    try:
        inspect.signature(trained_policy).bind(mdp, gamma, horizon, **options)
    except TypeError:
        valid = list(inspect.signature(trained_policy).parameters)[3:]
        raise InputError(f"policy '{spec}': unknown option(s) {sorted(options)}; valid options: "
                         f"{', '.join(valid)}") from None
    fraction = options.get("fraction", 0.5)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise InputError(f"trained policy: fraction must lie in [0, 1), got {fraction!r}")
