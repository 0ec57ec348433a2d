"""The report as one list of blocks, walked by both renderers (HTML and PDF), so the two cannot
drift. The prose lives in one Jinja template (``templates/report.md.j2``) written in a small
line-based markup; ``parse`` turns its rendered text into blocks:

    # Title @anchor            heading, level 1 to 3 (# to ###), with an optional anchor
    a paragraph                lines up to a blank line; {.meta} or {.note} at its start: a style
    - item                     bullets (consecutive lines)
    ::: box Title              a highlighted box: the bullets that follow, up to a blank line
    ::: formula TEXT           a displayed formula (math markup)
    ::: table KEY              a table the report assembled (``tables[KEY]``)
    ::: figure KEY             a figure (``figures[KEY]``; a left-out one becomes its note)
    ::: pre KEY                preformatted text (``texts[KEY]``)

Inline markup in text: $math$, `code`, **bold** (``reports.text.markup``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Block", "Box", "Bullets", "FigureBlock", "Formula", "Heading", "Para", "Pre", "Table",
           "parse"]


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass(frozen=True)
class Para:
    text: str
    style: str = "body"  # body | meta | note


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Box:
    title: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class Formula:
    text: str


@dataclass
class Table:
    """Cells are text with inline markup. A row given as a plain string is a group heading across
    all columns. kinds: one letter per column, t (text), n (number, right-aligned), m (code)."""

    head: list[str]
    rows: list
    kinds: str = ""
    widths: Sequence[float] = field(default_factory=list)  # relative column widths (PDF)
    red: set[int] = field(default_factory=set)  # indices into rows: highlighted
    collapsible: str = ""  # HTML: a collapsed <details> with this summary ("": always open)
    small: bool = False  # PDF: the smaller cell font (wide tables)

    def __post_init__(self):
        self.kinds = self.kinds or "t" * len(self.head)
        self.widths = self.widths or [1.0] * len(self.head)
        if len(self.kinds) != len(self.head) or len(self.widths) != len(self.head):
            raise ValueError(f"table {self.head}: {len(self.kinds)} kinds and {len(self.widths)} "
                             f"widths for {len(self.head)} columns")


@dataclass(frozen=True)
class FigureBlock:
    figure: object  # reports.figures.Figure


@dataclass(frozen=True)
class Pre:
    text: str


Block = Heading | Para | Bullets | Box | Formula | Table | FigureBlock | Pre

_HEADING = re.compile(r"^(#{1,3})\s+(.*?)(?:\s+@([\w-]+))?$")
_STYLE = re.compile(r"^\{\.(meta|note)\}\s*")


def parse(text: str, tables: dict, figures: dict, texts: dict | None = None) -> list[Block]:
    """Blocks of the rendered template ``text`` (see the module doc). An unknown table, figure
    or text key raises KeyError: the template and the assembled report disagree."""
    blocks: list[Block] = []
    para: list[str] = []
    bullets: list[str] = []
    box: tuple[str, list[str]] | None = None

    def flush() -> None:
        nonlocal box
        if para:
            joined = " ".join(para)
            m = _STYLE.match(joined)
            blocks.append(Para(joined[m.end():], m.group(1)) if m else Para(joined))
            para.clear()
        if box is not None:
            blocks.append(Box(box[0], tuple(bullets)))
            bullets.clear()
            box = None
        if bullets:
            blocks.append(Bullets(tuple(bullets)))
            bullets.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            flush()
            continue
        if line.startswith(":::"):
            flush()
            kind, _, arg = line[3:].strip().partition(" ")
            arg = arg.strip()
            if kind == "box":
                box = (arg, [])
            elif kind == "formula":
                blocks.append(Formula(arg))
            elif kind == "table":
                blocks.append(tables[arg])
            elif kind == "figure":
                blocks.append(FigureBlock(figures[arg]))
            elif kind == "pre":
                blocks.append(Pre((texts or {})[arg]))
            else:
                raise ValueError(f"unknown directive ':::{kind}' in the report template")
            continue
        if (m := _HEADING.match(line)):
            flush()
            blocks.append(Heading(len(m.group(1)), m.group(2), m.group(3) or ""))
        elif line.startswith("- "):
            if para:
                flush()
            bullets.append(line[2:])
        elif bullets and raw.startswith("  "):  # a bullet's continuation line
            bullets[-1] += " " + line
        else:
            if bullets and box is None:
                flush()
            para.append(line)
    flush()
    return blocks
