"""The self-contained HTML report: the report's blocks walked by one jinja2 template, figures
inlined as base64 PNG."""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2
from markupsafe import Markup

from .assemble import Report
from .text import markup

__all__ = ["render_html"]

TEMPLATES = Path(__file__).resolve().parent / "templates"


def render_html(report: Report) -> str:
    """The page as a string (no external resources: styles inline, images as data URIs)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["inline"] = lambda text: Markup(markup(str(text).replace("\n", " ")))
    env.filters["math"] = lambda text: Markup(markup(f"${text}$"))
    env.filters["b64"] = lambda png: base64.b64encode(png).decode()
    return env.get_template("page.html.j2").render(r=report)
