"""Sessions: tests, lint, bench, study, report, ui. Every install goes through constraints.txt."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints.txt")


def install(session: nox.Session, extras: str = "") -> None:
    """Install the project (and extras) with pinned versions; torch first so pip keeps the CPU wheel."""
    session.install(*CONSTRAINTS, "torch")
    session.install(*CONSTRAINTS, "-e", f".{extras}")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite on the CPU (pass pytest arguments after --)."""
    install(session, "[test]")
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the packages, tests and noxfile."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "suite", "estimators", "reports", "tests", "noxfile.py", "examples")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks; figures go to docs/benchmarks.md (pass --quick for a short run)."""
    install(session)
    session.run("python", "-m", "suite.bench", *session.posargs)


@nox.session(python=PYTHON)
def study(session: nox.Session) -> None:
    """Run a study end to end; `nox -s study -- FILE [options]` (default: the default study + report)."""
    install(session)
    args = session.posargs or ["studies/default.toml"]
    session.run("python", "-m", "suite", "study", *args)
    if not session.posargs:  # the default job ends with its report; `report` prints the paths
        session.run("python", "-m", "suite", "report", "studies/default.toml")


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """HTML + PDF report of a study's MLflow runs; `nox -s report -- FILE|NAME [--out DIR]`."""
    install(session)
    session.run("python", "-m", "suite", "report", *(session.posargs or ["studies/default.toml"]))


@nox.session(python=PYTHON)
def ui(session: nox.Session) -> None:
    """The MLflow UI on http://127.0.0.1:5000 against the same store as the studies."""
    install(session)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    session.run("mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
                os.environ.get("MLFLOW_UI_PORT", "5000"), *session.posargs)
