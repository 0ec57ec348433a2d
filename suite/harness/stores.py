"""Where a study's records live: store URLs (checked, reachable, printed with the password
masked), locks that serialise the steps that must not interleave, and the creation of the
stores themselves, which a kill cannot leave half done.

* Optuna storage: ``sqlite:///FILE`` (one machine) or ``postgresql://USER:PASSWORD@HOST[:PORT]/DB``
  (any number of machines; the driver comes with the ``[postgres]`` extra).
* MLflow tracking: ``sqlite:///FILE``, ``postgresql://...`` or ``http(s)://SERVER``.

Locks: a lock file ``FILE.lock`` (``flock``) for SQLite, a session advisory lock for PostgreSQL.
Both are released by the operating system or the server when their holder dies, so a killed
process never leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..core.errors import InputError

__all__ = ["CONNECT_TIMEOUT", "OPTUNA_SCHEMES", "TRACKING_SCHEMES", "StoreURL", "check_reachable",
           "create_sqlite_atomically", "engine_kwargs", "mask", "parse_store_url", "store_lock"]

OPTUNA_SCHEMES = ("sqlite", "postgresql")
TRACKING_SCHEMES = ("sqlite", "postgresql", "http", "https")
CONNECT_TIMEOUT = 4  # seconds one attempt to reach a server may take: two stores stay under 10 s
LOCK_TIMEOUT = 300  # seconds to wait for a lock that another process holds
_SECRET_KEYS = ("password", "passwd", "pwd", "token", "secret")


def mask(url: str) -> str:
    """The URL with its password (and password-like query values) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", url)
    netloc, changed = parts.netloc, False
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo, changed = userinfo.split(":", 1)[0] + ":***", True
        netloc = f"{userinfo}@{host}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in _SECRET_KEYS for k, _ in pairs):
        query = urlencode([(k, "***" if k.lower() in _SECRET_KEYS else v) for k, v in pairs],
                          safe="*")
        changed = True
    if not changed:
        return url  # urlunsplit would rewrite sqlite:////abs/path as sqlite://abs/path
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(text: str, url: str) -> str:
    """An error message with the URL's password removed wherever it appears."""
    try:
        secrets = [urlsplit(url).password or ""]
    except ValueError:
        secrets = []
    secrets += [v for k, v in parse_qsl(urlsplit(url).query) if k.lower() in _SECRET_KEYS]
    for secret in filter(None, secrets + [unquote(s) for s in secrets]):
        text = text.replace(secret, "***")
    return text.replace(url, mask(url))


@dataclass(frozen=True)
class StoreURL:
    """A checked store URL: its kind and, for SQLite, its file."""

    url: str
    kind: str  # "sqlite" | "postgresql" | "http"
    what: str  # "Optuna storage" | "MLflow tracking URI": how messages name it
    path: Path | None = None  # the database file of a SQLite store

    @property
    def masked(self) -> str:
        return mask(self.url)

    @property
    def file(self) -> Path:
        """The database file of a SQLite store (ValueError for a server's URL)."""
        if self.path is None:
            raise ValueError(f"{self.what} '{self.masked}' is a server's URL, not a SQLite file")
        return self.path


def parse_store_url(url: str, what: str, schemes: tuple[str, ...]) -> StoreURL:
    """Check the form of a store URL (nothing is opened); InputError names the rule and the fix."""
    examples = {"sqlite": "sqlite:///results/optuna.db",
                "postgresql": "postgresql://user:password@host:5432/db",
                "http": "http://127.0.0.1:5000"}
    fix = "use " + " or ".join(examples[s] for s in schemes if s in examples)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    base = scheme.split("+", 1)[0]
    if base not in schemes:
        raise InputError(f"{what} '{mask(url)}': unsupported scheme '{scheme or url}' (supported: "
                         f"{', '.join(schemes)}); {fix}")
    if base == "sqlite":
        if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:///:memory:"):
            raise InputError(f"{what} '{url}': a SQLite store needs a file, written "
                             "sqlite:///relative/path.db or sqlite:////absolute/path.db")
        path = Path(url[len("sqlite:///"):].split("?", 1)[0]).expanduser()
        if path.is_dir():
            raise InputError(f"{what} '{url}': {path} is a directory; name a database file in "
                             f"it, e.g. sqlite:///{path / 'optuna.db'}")
        return StoreURL(url, "sqlite", what, path.resolve())
    if base == "postgresql":
        if scheme not in ("postgresql", "postgresql+psycopg"):
            raise InputError(f"{what} '{mask(url)}': driver '{scheme}' is not supported; write "
                             "postgresql://... (the psycopg driver of the [postgres] extra)")
        parts = urlsplit(url)
        if not parts.hostname or not parts.path.strip("/"):
            raise InputError(f"{what} '{mask(url)}': a PostgreSQL URL needs a host and a "
                             f"database; {fix}")
        return StoreURL(url, "postgresql", what)
    parts = urlsplit(url)
    if not parts.hostname:
        raise InputError(f"{what} '{mask(url)}': an MLflow server URL needs a host; {fix}")
    return StoreURL(url, "http", what)


def engine_kwargs(store: StoreURL) -> dict:
    """SQLAlchemy engine options: bounded connect time; a SQLite writer waits for the lock."""
    if store.kind == "sqlite":
        return {"connect_args": {"timeout": 60}}
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}, "pool_pre_ping": True}


def _driver_hint(exc: BaseException) -> str | None:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError) or "No module named" in text:
        return ("the postgresql:// URL needs the psycopg driver: "
                "pip install 'pg-variance-suite[postgres]'")
    return None


def check_reachable(store: StoreURL) -> None:
    """Fail within a few seconds, in one line, when the store cannot be used: a SQLite file
    whose folder is missing or read-only (or that is not a database), a server that does not
    answer, a wrong password. Writes nothing."""
    if store.kind == "sqlite":
        _check_sqlite_file(store)
    elif store.kind == "postgresql":
        _check_postgres(store)
    else:
        _check_http(store)


def _check_sqlite_file(store: StoreURL) -> None:
    path = store.file
    folder = _existing_parent(path)
    if folder != path.parent and not os.access(folder, os.W_OK):
        raise InputError(f"{store.what} '{store.url}': cannot create folder {path.parent} "
                         f"({folder} is not writable); choose a writable place")
    if not folder.is_dir():
        raise InputError(f"{store.what} '{store.url}': {folder} is not a folder; choose a "
                         "path in a folder")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{store.what} '{store.url}': folder {folder} is not writable; choose "
                         "a writable place")
    if path.exists():
        if not path.is_file():
            raise InputError(f"{store.what} '{store.url}': {path} is not a regular file")
        with open(path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise InputError(f"{store.what} '{store.url}': {path} is not a SQLite database; "
                             "name a new file or an existing store")


def _existing_parent(path: Path) -> Path:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_postgres(store: StoreURL) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(store.url, poolclass=sqlalchemy.pool.NullPool,
                                          **{k: v for k, v in engine_kwargs(store).items()
                                             if k != "pool_pre_ping"})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:  # ImportError, OperationalError, ArgumentError, ...
        hint = _driver_hint(exc)
        if hint:
            raise InputError(f"{store.what} '{store.masked}': {hint}") from None
        raise InputError(f"{store.what} '{store.masked}' cannot be reached: "
                         f"{_first_line(exc, store.url)}; check that the server runs and the "
                         "URL's user, password, host, port and database") from None


def _check_http(store: StoreURL) -> None:
    import requests

    try:
        requests.get(store.url.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT)
    except requests.RequestException as exc:
        raise InputError(f"{store.what} '{store.masked}' cannot be reached: "
                         f"{_first_line(exc, store.url)}; start the MLflow server "
                         "(mlflow server ...) or fix MLFLOW_TRACKING_URI") from None


def _first_line(exc: BaseException, url: str) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(exc).__name__)
    return _scrub(first, url)[:300]


@contextlib.contextmanager
def store_lock(store: StoreURL, name: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the lock ``name`` of this store (every process that uses it takes the same one)."""
    if store.kind == "sqlite":
        path = store.file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(fd, timeout, f"{store.what} {store.url} ({name})")
            yield
        finally:
            os.close(fd)  # releases the lock
    elif store.kind == "postgresql":
        with _advisory_lock(store, name, timeout):
            yield
    else:
        yield  # an MLflow server serialises its own writes


def _flock(fd: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for the lock of {what}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _advisory_lock(store: StoreURL, name: str, timeout: float) -> Iterator[None]:
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"pg-variance-suite:{name}".encode()).digest()[:8],
                         "big", signed=True)
    engine = sqlalchemy.create_engine(store.url, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args={"connect_timeout": CONNECT_TIMEOUT})
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"SET lock_timeout = '{int(timeout * 1000)}ms'"))
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
    engine.dispose()


def create_sqlite_atomically(path: Path, build) -> bool:
    """Create the SQLite database ``path`` with ``build(url)`` in a temporary file beside it, then
    rename it into place: a kill leaves either no store or a whole one, never half of one.
    Call it holding the store's lock. Returns False when the file already existed."""
    if path.exists():
        return False
    for stale in path.parent.glob(f".{path.name}.creating-*"):  # left by a killed creator
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        build(f"sqlite:///{tmp}")
        with sqlite3.connect(tmp) as conn:  # make sure every page is on disk before the rename
            conn.execute("PRAGMA wal_checkpoint(FULL)")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        for extra in ("-journal", "-wal", "-shm"):
            Path(f"{tmp}{extra}").unlink(missing_ok=True)
    return True
