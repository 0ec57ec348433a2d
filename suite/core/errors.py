"""Input errors that name the rule, the value received and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["InputError", "did_you_mean", "unknown_name"]


class InputError(ValueError):
    """Bad user input. The message is one line: the rule, the value received and the fix.

    The command line prints it on stderr and exits with code 2, before writing anything.
    """


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest choice, or ';' when nothing is close."""
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[m] for m in difflib.get_close_matches(value.lower(), list(lowered), n=1)]
    return f"; did you mean '{close[0]}'?" if close else ";"


def unknown_name(kind: str, value: str, choices: Iterable[str]) -> InputError:
    """An error for a name outside a registry: "unknown estimator 'x'; did you mean 'y'? known: ..."."""
    choices = sorted(choices)
    return InputError(
        f"unknown {kind} '{value}'{did_you_mean(value, choices)} known: {', '.join(choices)}"
    )
