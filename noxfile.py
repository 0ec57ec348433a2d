"""Sessions: tests, lint, bench, study, report, ui. Every install goes through constraints.txt.

Every session shares one virtual environment, .nox/suite, so torch is installed once: the first
session creates it, and a session installs again only what it lacks (the test or lint extras) or
when constraints.txt or pyproject.toml changed. lint runs there too: mypy reads the types of the
packages the project imports (torch, numpy, optuna, ...) from where they are installed. Delete
.nox/suite to rebuild it from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints.txt")
SHARED = "suite"  # the shared environment: .nox/suite


def _interpreter(session: nox.Session) -> str:
    found = shutil.which(f"python{PYTHON}")
    if found:
        return found
    if sys.version_info[:2] == tuple(map(int, PYTHON.split("."))):
        return sys.executable
    session.error(f"the suite needs Python {PYTHON}; none found on PATH")


def shared_env(session: nox.Session, *extras: str) -> Path:
    """The shared environment with the project (and ``extras``) installed; returns its python.

    Torch goes first so that pip keeps the pinned CPU wheel. What was installed is recorded in the
    environment (a hash of constraints.txt and pyproject.toml, and the extras), and nothing is
    installed again while that still covers what the session needs.
    """
    env = session.cache_dir.parent / SHARED
    python = env / "bin" / "python"
    if not python.exists():
        session.run_install(_interpreter(session), "-m", "venv", str(env))
    stamp = env / "suite-installed.json"
    key = hashlib.sha256(Path("constraints.txt").read_bytes()
                         + Path("pyproject.toml").read_bytes()).hexdigest()
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    had = set(have.get("extras", [])) if have.get("key") == key else set()
    if have.get("key") != key or not set(extras) <= had:
        wanted = sorted(had | set(extras))
        if have.get("key") != key:
            session.run_install(str(python), "-m", "pip", "install", *CONSTRAINTS, "torch")
        session.run_install(str(python), "-m", "pip", "install", *CONSTRAINTS, "-e",
                            f".[{','.join(wanted)}]" if wanted else ".")
        stamp.write_text(json.dumps({"key": key, "extras": wanted}))
    else:
        session.log(f"{env} has what this session needs; nothing to install")
    session.env["VIRTUAL_ENV"] = str(env)
    session.env["PATH"] = os.pathsep.join([str(env / "bin"), os.environ.get("PATH", "")])
    return python


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite on the CPU (pass pytest arguments after --). The PostgreSQL tests use
    PG_TEST_URL, or start a server from Debian's postgresql package, and skip without one."""
    python = shared_env(session, "test", "postgres")
    session.run(str(python), "-m", "pytest", *(session.posargs or ["-q"]))


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff over the packages, tests, noxfile and examples; mypy over the packages ([tool.mypy] in
    pyproject.toml), in the shared environment, where the project's dependencies are installed."""
    python = shared_env(session, "lint")
    session.run(str(python), "-m", "ruff", "check", "suite", "estimators", "reports", "tests",
                "noxfile.py", "examples")
    session.run(str(python), "-m", "mypy")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Benchmarks; figures go to docs/benchmarks.md (pass --quick for a short run)."""
    python = shared_env(session)
    session.run(str(python), "-m", "suite.bench", *session.posargs)


@nox.session(venv_backend="none")
def study(session: nox.Session) -> None:
    """Run a study end to end; `nox -s study -- FILE [options]` (default: the default study + report)."""
    python = shared_env(session)
    # the default job: one worker process per core, up to 4 (its trials are independent)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    args = session.posargs or ["studies/default.toml", "--workers", workers]
    session.run(str(python), "-m", "suite", "study", *args)
    if not session.posargs:  # the default job ends with its report; `report` prints the paths
        session.run(str(python), "-m", "suite", "report", "studies/default.toml")


@nox.session(venv_backend="none")
def report(session: nox.Session) -> None:
    """HTML + PDF report of a study's MLflow runs; `nox -s report -- FILE|NAME [--out DIR]`."""
    python = shared_env(session)
    session.run(str(python), "-m", "suite", "report", *(session.posargs or ["studies/default.toml"]))


# prints each study's link: its experiment in the UI's model-training view
_LINKS = """import sys
from mlflow.tracking import MlflowClient
from suite.harness.tracking import ui_link
for e in MlflowClient(sys.argv[1]).search_experiments():
    if e.name != "Default":
        print(f"{e.name}: {ui_link(e.experiment_id, sys.argv[2])}")
"""


@nox.session(venv_backend="none")
def ui(session: nox.Session) -> None:
    """The MLflow UI on http://127.0.0.1:5000 against the same store as the studies."""
    python = shared_env(session)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    port = os.environ.get("MLFLOW_UI_PORT", "5000")
    session.run(str(python), "-c", _LINKS, uri, f"http://127.0.0.1:{port}")
    session.run(str(python), "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                "--port", port, *session.posargs)
