"""The MLflow tracking store, created whole before any trial runs.

MLflow creates a database store on first use by running its schema migrations one by one; on
SQLite they are not one transaction, so a kill in the middle used to leave a store that no
later run could open. Here a SQLite store is built in a temporary file and renamed into place
(under the store's lock, so concurrent invocations build it once); a store that an older version
left half built (no runs in it) is rebuilt, with one line saying so. A PostgreSQL store is
created under an advisory lock (PostgreSQL runs the migrations in one transaction).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..core.errors import InputError
from .stores import StoreURL, create_sqlite_atomically, store_lock

__all__ = ["prepare_tracking_store"]


def prepare_tracking_store(store: StoreURL) -> str | None:
    """Make sure the store exists and has MLflow's current schema. Returns a line to print when
    a half-built store was repaired; InputError when the store holds runs under an old schema."""
    if store.kind == "http":
        return None
    with store_lock(store, "mlflow-create"):
        if store.kind == "postgresql":
            _build(store.url, store)
            return None
        path = store.file
        state = _sqlite_state(path)
        if state == "whole":
            return None
        if state == "outdated":
            raise InputError(f"{store.what} '{store.url}' holds runs under an older MLflow schema; "
                             f"back it up, then run `mlflow db upgrade {store.url}`")
        repaired = state == "half"
        if repaired or state == "empty":
            path.unlink()
        create_sqlite_atomically(path, lambda url: _build(url, store))
        if repaired:
            return (f"repaired the MLflow store {path}: it was left half-built (by an interrupted "
                    "first run) and held no runs; it was rebuilt")
        return None


def _build(url: str, store: StoreURL) -> None:
    """Create (or verify) MLflow's schema at ``url`` as MlflowClient would, then let go of it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    try:
        _get_sqlalchemy_store(url, None)
    except Exception as exc:  # MlflowException: out-of-date schema, unreachable, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{store.what} '{store.masked}' cannot be used: "
                         f"{first.replace(url, store.masked)[:300]}") from None
    finally:
        if url != store.url:  # a temporary file: let go of it before it is renamed or removed
            engine = SqlAlchemyStore._engine_map.pop(url, None)
            if engine is not None:
                engine.dispose()


def _sqlite_state(path: Path) -> str:
    """absent | empty | whole | half (schema incomplete, no runs) | outdated (runs, old schema)."""
    if not path.exists():
        return "absent"
    if path.stat().st_size == 0:
        return "empty"
    from mlflow.store.db.utils import _get_latest_schema_revision

    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = (conn.execute("SELECT version_num FROM alembic_version").fetchone()
                   if "alembic_version" in tables else None)
        runs = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    if version is not None and version[0] == _get_latest_schema_revision():
        return "whole"
    return "outdated" if runs else "half"
