"""``python -m suite report STUDY.toml|STUDY_NAME [--out DIR]``."""

from __future__ import annotations

import argparse

from .build import build_report

__all__ = ["add_report_parser", "cmd_report"]


def cmd_report(args: argparse.Namespace) -> int:
    """Build the report from the study's MLflow runs and print where it went."""
    for path in build_report(args.study, out=args.out):
        print(f"wrote {path}")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the suite's command line."""
    p = subparsers.add_parser(
        "report", help="HTML and PDF report of a study, from its MLflow runs",
        description="Write report.html (self-contained) and report.pdf for a study, read from "
                    "MLflow (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db).")
    p.add_argument("study", help="a study file (studies/default.toml) or a study name (default)")
    p.add_argument("--out", help="output directory (default: results/NAME/report)")
    p.set_defaults(func=cmd_report)
    return p
