"""The trial queue in the Optuna storage: opening the storage, claiming a trial, committing a
result, and telling a dead worker's trial from a live one.

Exactly once rests on three guarantees of the storage, not on timing:

* a claim is one transaction that moves a trial from WAITING to RUNNING only if it is still
  WAITING (PostgreSQL: a row lock, ``SELECT ... FOR UPDATE``; SQLite: every transaction starts
  with ``BEGIN IMMEDIATE``, so a read and the write that follows it cannot interleave with
  another process's);
* a result is committed by one transaction that refuses a trial already finished, so a worker
  whose trial was failed meanwhile learns it and discards its result;
* each worker records a heartbeat (Optuna's, in the storage's clock) every ``interval`` seconds
  while it runs a trial; only a RUNNING trial whose heartbeat is older than ``grace`` seconds is
  dead for sure, and only such a trial may be failed by another process (``--fail-running``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage, _CachedStorage
from optuna.trial import FrozenTrial, TrialState

from ..core.errors import InputError
from .stores import StoreURL, create_sqlite_atomically, engine_kwargs, store_lock

__all__ = ["HEARTBEAT_ENV", "Heartbeat", "Pulse", "claim", "commit", "heartbeat_settings",
           "open_storage", "rdb_storage", "stale_trials"]

HEARTBEAT_ENV = "SUITE_HEARTBEAT"


@dataclass(frozen=True)
class Heartbeat:
    """How often a worker says it lives, and how long a silence proves it dead (seconds)."""

    interval: int = 10
    grace: int = 60


def heartbeat_settings() -> Heartbeat:
    """Defaults, or ``SUITE_HEARTBEAT="interval=1,grace=4"`` (tests use short ones)."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    values = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition("=")
        if key not in ("interval", "grace") or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"{HEARTBEAT_ENV}: expected interval=SECONDS,grace=SECONDS (whole "
                             f"numbers >= 1), got '{text}'")
        values[key] = int(value)
    beat = dataclasses.replace(Heartbeat(), **values)
    if beat.grace <= beat.interval:
        raise InputError(f"{HEARTBEAT_ENV}: grace ({beat.grace} s) must exceed interval "
                         f"({beat.interval} s), or a live worker could be taken for dead")
    return beat


def open_storage(store: StoreURL, beat: Heartbeat) -> optuna.storages.RDBStorage:
    """The Optuna storage, created (schema included) by exactly one process: under the store's
    lock, and for SQLite in a temporary file renamed into place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if store.kind == "sqlite":
            with store_lock(store, "optuna-create"):
                create_sqlite_atomically(store.file, _build_optuna)
            storage = optuna.storages.RDBStorage(
                store.url, engine_kwargs=engine_kwargs(store), heartbeat_interval=beat.interval,
                grace_period=beat.grace)
            _begin_immediate(storage.engine)
            return storage
        with store_lock(store, "optuna-create"):
            return optuna.storages.RDBStorage(
                store.url, engine_kwargs=engine_kwargs(store), heartbeat_interval=beat.interval,
                grace_period=beat.grace)


def _build_optuna(url: str) -> None:
    optuna.storages.RDBStorage(url).engine.dispose()


def _begin_immediate(engine) -> None:
    """Every SQLite transaction takes the write lock when it begins (SQLAlchemy's recipe for
    serializable SQLite): Optuna's read-then-update steps become atomic across processes."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, record):
        dbapi_connection.isolation_level = None  # pysqlite must not start transactions itself

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed are closed


def _cached(study: optuna.Study) -> _CachedStorage:
    """The study's storage: an RDBStorage (open_storage's) under the cache Optuna puts over it."""
    storage = study._storage
    if not isinstance(storage, _CachedStorage):
        raise TypeError(f"study '{study.study_name}' is not on an RDB storage")
    return storage


def rdb_storage(study: optuna.Study) -> RDBStorage:
    """The RDBStorage under the study's cache (its SQL session, its heartbeat table)."""
    return _cached(study)._backend


def claim(study: optuna.Study) -> optuna.Trial | None:
    """The next WAITING trial, now RUNNING and owned by this process, or None when none waits.

    Its heartbeat is recorded before the claim, so no trial is ever RUNNING without one (a
    worker killed right after claiming still leaves a heartbeat that goes stale)."""
    storage = _cached(study)
    for frozen in storage.get_all_trials(study._study_id, deepcopy=False,
                                         states=(TrialState.WAITING,)):
        storage.record_heartbeat(frozen._trial_id)
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                study._thread_local.cached_all_trials = None
                return optuna.Trial(study, frozen._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def commit(study: optuna.Study, trial: optuna.Trial, state: TrialState,
           values: list[float] | None = None) -> bool:
    """Finish the trial; False when another process finished it first (it was failed as dead
    while this one still ran): the caller discards its result."""
    try:
        frozen = study.tell(trial, values if state == TrialState.COMPLETE else None, state=state,
                            skip_if_finished=True)
    except UpdateFinishedTrialError:
        return False
    return frozen.state == state and (state != TrialState.COMPLETE or frozen.values == values)


def stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials whose heartbeat is older than the grace period: their worker is gone."""
    ids = set(_cached(study)._get_stale_trial_ids(study._study_id))
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t._trial_id in ids]


class Pulse:
    """A daemon thread that calls ``beat()`` now and then every ``interval`` seconds until the
    block ends; an error in ``beat`` is ignored (the next one may succeed)."""

    def __init__(self, beat: Callable[[], None], interval: float, cleanup=None):
        self._beat, self._interval, self._cleanup = beat, interval, cleanup
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    def _run(self) -> None:
        try:
            while True:
                try:
                    self._beat()
                except Exception:  # noqa: BLE001 - a missed beat is retried
                    pass
                if self._stop.wait(self._interval):
                    return
        finally:
            if self._cleanup:
                self._cleanup()

    def __enter__(self) -> Pulse:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
