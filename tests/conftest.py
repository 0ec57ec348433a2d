"""Shared fixtures: tiny MDPs small enough to enumerate every trajectory."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import numpy as np
import pytest
import torch

from suite.core.mdp import MDP

from . import pgserver


def tiny_mdp(seed: int = 0, S: int = 3, A: int = 2, terminating: bool = True) -> MDP:
    """A random MDP with S states and A actions; some transitions terminate when asked."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(S), size=(S, A))
    P[0, 0] = 0.0
    P[0, 0, 1] = 1.0  # a deterministic row
    R = rng.normal(size=(S, A, S))
    term = np.zeros((S, A, S), dtype=bool)
    if terminating:
        term[:, :, S - 1] = rng.uniform(size=(S, A)) < 0.7
    rho0 = rng.dirichlet(np.ones(S))
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    return MDP(t(P), t(R), torch.as_tensor(term), t(rho0), name=f"tiny{seed}")


@pytest.fixture(params=[True, False], ids=["terminating", "continuing"])
def tiny(request) -> MDP:
    return tiny_mdp(seed=1, terminating=request.param)


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """Temporary MLflow and Optuna stores (SQLite); the working directory is tmp_path.
    Returns (tmp_path, MLflow tracking URI, Optuna storage URL)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return tmp_path, uri, f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.fixture(scope="session")
def pg_server():
    """URL of a PostgreSQL server for the tests: ``PG_TEST_URL`` (``.ci/run`` starts one), or a
    throwaway server started here from Debian's binaries. Skipped, saying why, only where none
    can be started; a ``PG_TEST_URL`` that does not answer fails the tests that use it."""
    pytest.importorskip("psycopg", reason="the psycopg driver is missing: "
                                          "pip install -e '.[test,postgres]'")
    url = os.environ.get("PG_TEST_URL")
    if url:
        yield url
        return
    if pgserver.find_bin() is None:
        pytest.skip("no PostgreSQL server: set PG_TEST_URL, or install Debian's postgresql "
                    "package (.ci/run does)")
    directory = tempfile.mkdtemp(prefix="pg-suite-")  # under /tmp: the server user can reach it
    try:
        url = pgserver.start(directory)
    except Exception as exc:  # noqa: BLE001 - any failure to start means: no server here
        pytest.skip(f"no PostgreSQL server could be started: {exc}")
    yield url
    pgserver.stop(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_database(pg_server):
    """A function that creates a fresh, empty database on the test server and returns its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_server, isolation_level="AUTOCOMMIT")

    def create() -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        return pg_server.rsplit("/", 1)[0] + "/" + name

    yield create
    engine.dispose()
