"""``build_report``: a study's MLflow runs -> report.html and report.pdf, all or nothing."""

from __future__ import annotations

from pathlib import Path

from suite.core.io import check_out_dir, write_files

from .assemble import assemble
from .load import load_runs, study_name
from .render_html import render_html
from .render_pdf import render_pdf

__all__ = ["build_report"]


def build_report(study: str, out: str | Path | None = None, uri: str | None = None) -> list[Path]:
    """Write report.html and report.pdf for ``study`` (a study file or a study name) into ``out``
    (default results/NAME/report); return the paths. Raises ``suite.core.errors.InputError`` on bad
    input, before anything is written; each file appears whole or not at all."""
    name = study_name(study)
    if out:
        check_out_dir(out)
    report = assemble(load_runs(name, uri))
    html = render_html(report).encode()
    pdf = render_pdf(report)
    out_dir = Path(out) if out else Path("results") / name / "report"
    return write_files(out_dir, {"report.html": html, "report.pdf": pdf})
