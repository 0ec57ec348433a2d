"""The estimator registry. ``estimators.get("reinforce")``, ``estimators.names()``.

Adding an estimator: write a short function of a ``Context`` in one of the modules below (or your
own, imported here), decorate it with ``@register(name, formula=..., unbiased=..., condition=...,
reference=...)``; the registry-wide tests then prove its claim by exact enumeration.
"""

from . import returns  # noqa: F401, I001  (first: reinforce leads the registry)
from . import baselines, critics, final_formula, groups  # noqa: F401  (populate the registry)
from .context import Context
from .registry import REGISTRY, Estimator, StepDraw, get, names, register, resolve

__all__ = ["REGISTRY", "Context", "Estimator", "StepDraw", "get", "names", "register", "resolve"]
