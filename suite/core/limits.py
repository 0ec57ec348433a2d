"""Upper bounds on what one run may ask for, so that a typo fails in one line instead of
allocating petabytes or writing gigabytes.

Each bound can be raised (or lowered) with the environment variable ``SUITE_LIMITS``, a list of
``name=value`` items, for example ``SUITE_LIMITS="trajectories=1e9,horizon=50000"``.
docs/studies.md lists the bounds and why they are where they are.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .errors import InputError, did_you_mean

__all__ = ["ENV_VAR", "Limits", "check_limit", "limits"]

ENV_VAR = "SUITE_LIMITS"


@dataclass(frozen=True)
class Limits:
    """The bounds in force (defaults: a few minutes to hours of work on one machine)."""

    trajectories: int = 100_000_000  # trajectories of one measurement (N)
    horizon: int = 10_000  # H: the exact tables hold H x S x A numbers
    state_actions: int = 100_000  # S x A of an environment (tabular parameters, Q_t rows)
    transitions: int = 50_000_000  # S x A x S: entries of the dense tables P and R (400 MB each)
    parameters: int = 1_000_000  # parameters of a policy (mlp:hidden=...)
    template_chars: int = 1_000  # characters of a filled {template} in a study file


def limits() -> Limits:
    """The defaults, overridden by ``SUITE_LIMITS``; a malformed override is an InputError."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return Limits()
    names = [f.name for f in dataclasses.fields(Limits)]
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in names:
            raise InputError(f"{ENV_VAR}: unknown bound '{key}'{did_you_mean(key, names)} known: "
                             f"{', '.join(names)}")
        try:
            number = float(value) if eq else float("nan")
        except ValueError:
            number = float("nan")
        if not number >= 1 or number != int(number):
            raise InputError(f"{ENV_VAR}: {key} must be a whole number >= 1 (e.g. {key}=1e9), "
                             f"got '{value.strip()}'")
        values[key] = int(number)
    return dataclasses.replace(Limits(), **values)


def check_limit(name: str, value: int, what: str) -> None:
    """Raise InputError when ``value`` exceeds the bound ``name`` (one line, with the override)."""
    bound = getattr(limits(), name)
    if value > bound:
        raise InputError(f"{what} is {value:,}, above the bound of {bound:,} {name}; ask for "
                         f"less, or raise the bound with {ENV_VAR}={name}=N (docs/studies.md, "
                         "Bounds)")
