"""Parsing of compact specs such as ``garnet:S=20,A=4,branching=3,seed=0``."""

from __future__ import annotations

from .errors import InputError

__all__ = ["parse_spec", "parse_value"]


def parse_value(text: str) -> bool | int | float | str:
    """'true' -> True, '3' -> 3, '0.5' -> 0.5, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(spec: str) -> tuple[str, dict[str, bool | int | float | str]]:
    """Split ``NAME[:key=value,...]`` into the name and its keyword arguments."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, bool | int | float | str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InputError(
                f"spec '{spec}': options must be written key=value, got '{item}' "
                f"(example: garnet:S=20,A=4,branching=3,seed=0)"
            )
        kwargs[key.strip()] = parse_value(value)
    return name.strip(), kwargs
