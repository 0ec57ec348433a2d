"""What killed invocations left behind, found by the next one: trials RUNNING in Optuna whose
worker is gone, and MLflow runs still RUNNING although nobody works on them.

Gone means proven gone: a trial's heartbeat is older than the grace period (Optuna records it
in the storage's own clock), an invocation run's heartbeat tag likewise. A trial whose heartbeat
is fresh belongs to a live worker, here or on another machine, and is never touched. Finding
writes nothing; ``close`` (``--fail-running``) fails the dead trials, so that they are redone,
and closes the runs: FINISHED when their trial completed (the result was committed), KILLED
otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from .queue import Heartbeat, rdb_storage, stale_trials
from .tracking import Tracker

__all__ = ["Leftovers", "close", "find"]


@dataclass(frozen=True)
class Leftovers:
    dead: tuple[tuple[str, int], ...]  # (Optuna study, trial number) RUNNING, worker gone
    live: int  # trials RUNNING with a fresh heartbeat (another live process)
    unproven: tuple[tuple[str, int], ...]  # RUNNING without any heartbeat (older versions)
    runs: tuple[tuple[str, str], ...]  # (MLflow run id, status to close it with)

    def lines(self, name: str, fixed: bool) -> list[str]:
        """What to tell the user, one line per kind of leftover."""
        out = []
        numbers = ", ".join(f"{n}" + (" (added estimators)" if s.endswith("/added") else "")
                            for s, n in self.dead)
        if self.dead and fixed:
            out.append(f"study {name}: failed {len(self.dead)} trial(s) whose worker is gone (no "
                       f"heartbeat within the grace period): {numbers}; they are redone")
        elif self.dead:
            out.append(f"study {name}: {len(self.dead)} trial(s) were left RUNNING by a worker "
                       f"that is gone (no heartbeat within the grace period): {numbers}; rerun "
                       "with --fail-running to redo them")
        if self.live:
            out.append(f"study {name}: {self.live} trial(s) are running in another live process "
                       "(fresh heartbeat); they are left to it")
        if self.unproven:
            out.append(f"study {name}: trial(s) {', '.join(str(n) for _, n in self.unproven)} "
                       "are RUNNING without a heartbeat (started by an older version): nothing "
                       "proves their worker gone, so they are left alone")
        if self.runs and fixed:
            out.append(f"study {name}: closed {len(self.runs)} MLflow run(s) left RUNNING by "
                       "killed invocations")
        elif self.runs:
            out.append(f"study {name}: {len(self.runs)} MLflow run(s) were left RUNNING by killed "
                       "invocations; rerun with --fail-running to close them")
        return out


def find(studies: Iterable[optuna.Study], tracker: Tracker, beat: Heartbeat,
         own_run: str | None = None) -> Leftovers:
    """Look (read only) at the studies' RUNNING trials and the experiment's RUNNING runs."""
    dead, unproven, live = [], [], 0
    by_id: dict[int, TrialState] = {}
    dead_ids: set[int] = set()
    for study in studies:
        stale = {t._trial_id for t in stale_trials(study)}
        for t in study.get_trials(deepcopy=False):
            by_id[t._trial_id] = t.state
            if t.state != TrialState.RUNNING:
                continue
            if t._trial_id in stale:
                dead.append((study.study_name, t.number))
                dead_ids.add(t._trial_id)
            elif _has_heartbeat(study, t._trial_id):
                live += 1
            else:
                unproven.append((study.study_name, t.number))
    runs = []
    now = time.time()
    for run in tracker.client.search_runs([tracker.experiment_id],
                                          filter_string="attributes.status = 'RUNNING'",
                                          max_results=5000):
        tags = run.data.tags
        if run.info.run_id == own_run:
            continue
        if tags.get("kind") == "invocation":
            beat_at = float(tags.get("heartbeat", "nan"))
            if now - beat_at > beat.grace:  # False for NaN: no heartbeat proves nothing
                runs.append((run.info.run_id, "KILLED"))
            continue
        trial_id = int(tags.get("optuna_trial_id", -1))
        state = by_id.get(trial_id)
        if trial_id in dead_ids or state in (TrialState.FAIL, TrialState.WAITING):
            runs.append((run.info.run_id, "KILLED"))
        elif state in (TrialState.COMPLETE, TrialState.PRUNED):
            runs.append((run.info.run_id, "FINISHED"))  # committed: the result is whole
    return Leftovers(tuple(dead), live, tuple(unproven), tuple(runs))


def _has_heartbeat(study: optuna.Study, trial_id: int) -> bool:
    from optuna.storages._rdb import models

    session = rdb_storage(study).scoped_session()
    try:
        return models.TrialHeartbeatModel.where_trial_id(trial_id, session) is not None
    finally:
        session.close()


def close(leftovers: Leftovers, studies: Iterable[optuna.Study], tracker: Tracker) -> None:
    """Fail the dead trials (only if still RUNNING: a trial that finished meanwhile is kept)
    and close the runs."""
    from optuna.exceptions import UpdateFinishedTrialError

    named = {s.study_name: s for s in studies}
    for name, number in leftovers.dead:
        study = named[name]
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        try:
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
            study._storage.set_trial_user_attr(trial_id, "error", "its worker died (heartbeat "
                                                                   "stale); failed by a later run")
        except UpdateFinishedTrialError:
            pass
    for run_id, status in leftovers.runs:
        if status == "KILLED":
            tracker.client.set_tag(run_id, "error", "left RUNNING by a killed invocation")
        tracker.end(run_id, status)
