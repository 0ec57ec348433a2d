"""Reports of a study, built from its MLflow runs only: ``report.html`` (self-contained) and
``report.pdf``.

    from reports import build_report
    build_report("studies/default.toml")            # -> results/default/report/report.{html,pdf}
"""

from .assemble import Report, assemble
from .build import build_report

__all__ = ["Report", "assemble", "build_report"]
