"""Formatting shared by every part of the report: numbers, intervals, ranges, and the inline markup
of the prose ($math$, `code`, **bold**) for HTML and for reportlab's paragraphs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial
from typing import Literal
from xml.sax.saxutils import escape

import pandas as pd

__all__ = ["breakable", "ci", "cosine", "count", "fmt", "markup", "plural", "span"]


def fmt(x: float | None, digits: int = 3) -> str:
    """3 significant digits; 1.2e5 style outside [0.001, 10^4); ∞ and – for inf and missing."""
    if x is None or pd.isna(x):
        return "–"
    x = float(x)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    if 10 ** (digits - 1) <= abs(x) < 1e4:
        return f"{x:.0f}"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    mantissa, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exp)}"


def cosine(c: float | None) -> str:
    """A cosine with the digits that tell it from 1: 0.998, 0.99997, 1 (within 1e-6)."""
    if c is None or pd.isna(c):
        return "–"
    if c >= 1 - 1e-6:
        return "1"
    if c < 0.99:
        return f"{c:.3g}"
    return f"{c:.{max(3, math.ceil(-math.log10(1 - c)) + 1)}f}".rstrip("0")


def ci(point: float, lo: float, hi: float, digits: int = 3) -> str:
    """'0.31 [0.28, 0.35]' (the interval left out when it is missing)."""
    if pd.isna(lo) or pd.isna(hi):
        return fmt(point, digits)
    return f"{fmt(point, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def span(values, digits: int | Literal["cos"] = 3) -> str:
    """One value, or 'median (min–max)' of several (missing values ignored); digits "cos":
    formatted as cosines."""
    v = pd.Series(values, dtype=float).dropna()
    if v.empty:
        return "–"
    show: Callable[[float], str]
    small: Callable[[float], str]
    if digits == "cos":
        show = small = cosine
    else:
        show, small = partial(fmt, digits=digits), partial(fmt, digits=2)
    lo, hi = show(v.min()), show(v.max())
    if lo == hi:
        return show(v.median())
    if small(v.min()) == small(v.max()):  # the short form would hide the range
        small = show
    return f"{show(v.median())} ({small(v.min())}–{small(v.max())})"


def breakable(name: str) -> str:
    """An environment spec that a narrow table cell can wrap: a space after each comma."""
    return str(name).replace(",", ", ")


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 condition', '3 conditions'."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def count(k: int, n: int) -> str:
    """'all 5', 'none of 5', '3 of 5'."""
    if n and k == n:
        return f"all {n}" if n > 2 else ("both" if n == 2 else "the one")
    if k == 0:
        return f"none of {n}"
    return f"{k} of {n}"


_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def markup(text: str, target: str = "html") -> str:
    """Escape ``text`` for HTML (``target`` "html") or a reportlab paragraph ("pdf"); inline
    markup: $...$ spans are math (x_t, x^t, x_{..}, x^{..} become sub- and superscripts),
    `...` is code, **...** bold."""
    sup = "sup" if target == "html" else "super"
    code = ("<code>{}</code>" if target == "html" else "<font face='DejaVuMono'>{}</font>")
    out = []
    for i, part in enumerate(text.split("$")):
        if i % 2:
            part = escape(part)
            part = re.sub(r"_\{([^}]*)\}|_([A-Za-z0-9*']+)", r"<sub>\1\2</sub>", part)
            part = re.sub(r"\^\{([^}]*)\}|\^([A-Za-z0-9*'−-]+)", rf"<{sup}>\1\2</{sup}>", part)
            out.append(f"<i>{part}</i>" if target == "html" else part)
            continue
        pieces = _CODE.split(part)  # odd pieces are code
        for j, piece in enumerate(pieces):
            if j % 2:
                out.append(code.format(escape(piece)))
            else:
                out.append(_BOLD.sub(r"<b>\1</b>", escape(piece)))
    return "".join(out)
