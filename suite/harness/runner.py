"""Running a study: check everything, plan under the study's lock, then let workers claim trials.

An invocation (1) validates the study file, every condition it names, the store URLs and that
the stores answer, before it writes anything; (2) opens (or creates, whole) the Optuna and MLflow
stores; (3) under the study's plan lock, refuses an edit that changes what existing results
mean, reports what killed invocations left behind (and with ``--fail-running`` fails the trials
whose worker is provably gone), and queues what is still missing: conditions, and estimators
added to complete conditions; (4) runs workers (in this process, or ``--workers N`` spawned
processes) that claim queued trials one at a time until the queue is empty. Any number of
invocations, on any number of machines sharing a PostgreSQL storage, may do this at once: each
trial is claimed by one worker, each result committed once (see ``suite.harness.queue``).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from ..core.errors import InputError
from ..core.io import check_out_dir
from ..core.sampler import resolve_device
from . import leftovers
from .mlflow_store import prepare_tracking_store
from .plan import (
    DONE,
    Addition,
    added_name,
    check_definition,
    queue_additions,
    queue_conditions,
    record_definition,
    waiting,
)
from .pool import INTERRUPTED, deferred_signals, ignore_signals, interrupt_on_sigterm, run_processes
from .preflight import check_conditions
from .progress import Progress
from .queue import Heartbeat, Pulse, claim, commit, heartbeat_settings, open_storage
from .stores import OPTUNA_SCHEMES, TRACKING_SCHEMES, StoreURL, check_reachable, parse_store_url, store_lock
from .study import directions, make_sampler, run_added, run_trial, trial_label, trial_work
from .study_spec import StudySpec, load_study
from .tracking import Tracker, environment_tags, tracking_uri

__all__ = ["MAX_WORKERS", "StudyOutcome", "default_storage", "run_study", "worker"]

MAX_WORKERS = 256


@dataclass(frozen=True)
class StudyOutcome:
    name: str
    storage: str  # the Optuna storage URL, password masked
    tracking_uri: str  # the MLflow tracking URI, password masked
    parent_run_id: str
    complete: int  # conditions done in the storage after this invocation
    failed_now: int  # trials that failed in this invocation
    out_dir: Path
    experiment_id: str = ""  # the study's MLflow experiment
    added: tuple[Addition, ...] = ()  # estimators this invocation queued for complete conditions
    notes: tuple[str, ...] = field(default=())  # leftovers and other things the user must know


@dataclass(frozen=True)
class WorkerJob:
    """What a worker needs; picklable (spawned processes get it through a pipe, not argv)."""

    spec_path: str
    storage: str
    tracking: str
    parent: str  # the invocation's MLflow run
    worker: str  # this worker's id: PARENT/i, recorded on the trials it claims
    beat: Heartbeat
    threads: int | None = None  # torch threads (the cores shared between the workers)


def default_storage(spec: StudySpec, out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'optuna.db').resolve()}"


def run_study(path: str | Path, storage: str | None = None, workers: int = 1,
              trials: int | None = None, out_dir: str | Path | None = None,
              fail_running: bool = False, start_over: bool = False, progress: bool = True,
              say: Callable[[str], None] | None = None) -> StudyOutcome:
    """Run (or resume, or extend) the study in ``path``; see the module doc. ``say`` prints what
    the plan adds and what was left behind (default: stderr)."""
    say = say or (lambda line: print(line, file=sys.stderr))
    spec = load_study(path)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise InputError(f"--workers must be a whole number in [1, {MAX_WORKERS}], got {workers}")
    if trials is not None and trials < 1:
        raise InputError(f"--trials must be >= 1, got {trials}")
    check_conditions(spec)
    out = Path(out_dir) if out_dir else Path("results") / spec.name
    check_out_dir(out)
    store = parse_store_url(storage or default_storage(spec, out), "Optuna storage", OPTUNA_SCHEMES)
    tracking = parse_store_url(tracking_uri(), "MLflow tracking URI", TRACKING_SCHEMES)
    beat = heartbeat_settings()
    device = str(resolve_device(spec.device))
    check_reachable(store)
    check_reachable(tracking)
    optuna_storage = open_storage(store, beat)
    if not start_over and (existing := _load(optuna_storage, spec.name, spec)) is not None:
        check_definition(existing, spec, store.masked)  # before the MLflow store is touched
    repaired = prepare_tracking_store(tracking)
    if repaired:
        say(repaired)
    tracker = Tracker(spec.name, tracking.url)
    with store_lock(store, f"plan:{spec.name}"):
        main, added = _studies(optuna_storage, spec, store, tracker, start_over, beat, say)
        left = leftovers.find([main, added], tracker, beat)
        if fail_running:
            leftovers.close(left, [main, added], tracker)
        conditions = queue_conditions(main, spec, trials)
        additions = tuple(queue_additions(main, added, spec, _recorded_by_mlflow(tracker)))
    left_lines = left.lines(spec.name, fixed=fail_running)
    notes = list(left_lines)
    for line in left_lines:
        say(line)
    for line in _addition_lines(spec.name, additions):
        say(line)
    queued = conditions.waiting + waiting(added)
    parent = tracker.start(f"{spec.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                           tags={"kind": "invocation", "study": spec.name,
                                 "study_sha256": spec.sha256, "optuna_storage": store.masked,
                                 "sampler": spec.sampler, "heartbeat": f"{time.time():.0f}",
                                 **environment_tags(device)},
                           params={"workers": workers, "queued_trials": queued,
                                   "study_file": str(spec.path)})
    tracker.log_file(parent, spec.path)
    job = WorkerJob(str(spec.path), store.url, tracking.url, parent, f"{parent}/0", beat)
    restore_signals = interrupt_on_sigterm()
    follow = _Follow(spec, [main, added], trials, progress)
    try:
        with Pulse(lambda: tracker.client.set_tag(parent, "heartbeat", f"{time.time():.0f}"),
                   beat.interval):
            if workers == 1:
                worker(job, trials, on_trial=follow.update)
            else:
                notes += _in_processes(job, workers, trials, follow, spec.name, [main, added],
                                       tracker)
    except KeyboardInterrupt:
        tracker.end(parent, "KILLED")
        raise
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    finally:
        follow.close()
        restore_signals()
    mine = [t for s in (main, added) for t in s.get_trials(deepcopy=False)
            if str(t.user_attrs.get("worker", "")).startswith(parent + "/")]
    failed = sum(t.state == TrialState.FAIL and t.user_attrs.get("failed_by") == parent
                 for t in mine)
    complete = sum(t.state in DONE for t in main.get_trials(deepcopy=False))
    running = sum(t.state == TrialState.RUNNING for s in (main, added)
                  for t in s.get_trials(deepcopy=False))
    if running:
        notes.append(f"study {spec.name}: {running} trial(s) still running in other processes")
    for line in notes[len(left_lines):]:
        say(line)
    tracker.log(parent, {"trials/complete": complete, "trials/failed_now": failed,
                         "trials/finished_now": sum(t.state.is_finished() for t in mine)})
    tracker.end(parent, "FINISHED" if failed == 0 else "FAILED")
    return StudyOutcome(spec.name, store.masked, tracking.masked, parent, complete, failed, out,
                        tracker.experiment_id, additions, tuple(notes))


def _load(storage, name: str, spec: StudySpec) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(spec))
    except KeyError:
        return None


def _studies(storage, spec: StudySpec, store: StoreURL, tracker: Tracker, start_over: bool,
             beat: Heartbeat, say) -> tuple[optuna.Study, optuna.Study]:
    """The study and its study of added estimators, created when new (the definition recorded)
    or checked against the file; with ``start_over``, emptied first. Hold the plan lock."""
    main = _load(storage, spec.name, spec)
    if main is not None and start_over:
        _start_over(storage, main, spec, tracker, beat, say)
        main = None
    if main is None:
        try:
            main = optuna.create_study(study_name=spec.name, storage=storage,
                                       directions=directions(spec), sampler=make_sampler(spec))
        except optuna.exceptions.DuplicatedStudyError:  # pragma: no cover - the lock prevents it
            main = optuna.load_study(study_name=spec.name, storage=storage,
                                     sampler=make_sampler(spec))
        record_definition(main, spec)
    else:
        check_definition(main, spec, store.masked)
        if [d.name.lower() for d in main.directions] != directions(spec):
            raise InputError(f"{spec.path}: the objectives' directions {directions(spec)} differ "
                             f"from study '{spec.name}' in {store.masked}; give the study a new "
                             "name or rerun with --start-over")
    added = optuna.create_study(study_name=added_name(spec.name), storage=storage,
                                load_if_exists=True, directions=["minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=spec.seeds[0]))
    return main, added


def _start_over(storage, main: optuna.Study, spec: StudySpec, tracker: Tracker, beat: Heartbeat,
                say) -> None:
    """Discard the study's trials and MLflow runs (refused while a live worker runs one)."""
    added = _load(storage, added_name(spec.name), spec)
    left = leftovers.find([s for s in (main, added) if s is not None], tracker, beat)
    if left.live:
        raise InputError(f"--start-over: {left.live} trial(s) of study '{spec.name}' are running "
                         "in a live process; stop it (or wait for it) first")
    n_trials = 0
    for study in (main, added):
        if study is not None:
            n_trials += len(study.get_trials(deepcopy=False))
            optuna.delete_study(study_name=study.study_name, storage=storage)
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=50_000)
    for run in runs:
        tracker.client.delete_run(run.info.run_id)
    say(f"study {spec.name}: started over: discarded {n_trials} trial(s) and {len(runs)} MLflow "
        "run(s)")


def _recorded_by_mlflow(tracker: Tracker) -> Callable:
    """Finished estimators of a trial, read from MLflow (trials of older versions say nothing)."""
    cache: dict[str, set[str]] = {}

    def recorded(trial) -> set[str] | None:
        if not cache:
            for run in tracker.client.search_runs(
                    [tracker.experiment_id], max_results=50_000,
                    filter_string="tags.kind = 'estimator' and attributes.status = 'FINISHED'"):
                tags = run.data.tags
                condition = tags.get("condition_run") or tags.get("mlflow.parentRunId", "")
                cache.setdefault(condition, set()).add(run.data.params.get("estimator", ""))
            cache.setdefault("", set())
        run_id = trial.user_attrs.get("mlflow_run_id")
        return cache.get(run_id) if run_id else None

    return recorded


def _addition_lines(name: str, additions: tuple[Addition, ...]) -> list[str]:
    by_set: dict[tuple[str, ...], list[int]] = {}
    for a in additions:
        by_set.setdefault(a.estimators, []).append(a.trial)
    return [f"study {name}: adding {', '.join(names)} to {len(numbers)} complete condition(s) "
            f"(trials {', '.join(map(str, sorted(numbers)))}), same seeds and trajectories"
            for names, numbers in by_set.items()]


# ------------------------------------------------------------------------------------ workers
class _Follow:
    """Progress of the invocation's queues: the conditions, and the added estimators."""

    def __init__(self, spec: StudySpec, studies: list[optuna.Study], limit: int | None,
                 enabled: bool):
        self.items = [(study, Progress(
            study.study_name, study.get_trials(deepcopy=False, states=(TrialState.WAITING,)),
            limit, lambda p: trial_work(spec, p), lambda p: trial_label(spec, p),
            enabled=enabled)) for study in studies]

    def update(self) -> None:
        for study, progress in self.items:
            progress.update(study.get_trials(deepcopy=False))

    def close(self) -> None:
        self.update()
        for _, progress in self.items:
            progress.close()


def _in_processes(job: WorkerJob, n: int, trials: int | None, follow: _Follow, name: str,
                  studies: list[optuna.Study], tracker: Tracker) -> list[str]:
    """N spawned workers; a worker that died (killed, crashed) has its trials failed here, since
    its death is certain, so they are redone by the next run."""
    threads = max(1, (os.cpu_count() or 1) // n)
    budget = multiprocessing.get_context("spawn").Value("i", trials if trials else -1)
    jobs = [(replace(job, worker=f"{job.parent}/{i}", threads=threads), budget) for i in range(n)]
    try:
        codes = run_processes(_worker_entry, jobs, on_tick=follow.update)
    except KeyboardInterrupt:  # every worker has stopped: a trial still RUNNING is orphaned
        _fail_trials_of({j.worker: -1 for j, _ in jobs}, studies, tracker)
        raise
    dead = {j.worker: c for (j, _), c in zip(jobs, codes, strict=True) if c not in (0, 1, INTERRUPTED)}
    notes = []
    if dead:
        lost = _fail_trials_of(dead, studies, tracker)
        notes.append(f"study {name}: {len(dead)} worker(s) died (exit codes "
                     f"{', '.join(str(c) for c in dead.values())}); their {lost} trial(s) were "
                     "marked failed and are redone by the next run")
    if any(c == INTERRUPTED for c in codes):
        raise KeyboardInterrupt
    return notes


def _fail_trials_of(dead: dict[str, int], studies: list[optuna.Study], tracker: Tracker) -> int:
    n = 0
    for study in studies:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker") in dead:
                study._storage.set_trial_user_attr(t._trial_id, "error", "its worker process died "
                                                   f"(exit code {dead[t.user_attrs['worker']]})")
                study._storage.set_trial_user_attr(t._trial_id, "failed_by",
                                                   t.user_attrs["worker"].rsplit("/", 1)[0])
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                for run in tracker.client.search_runs(
                        [tracker.experiment_id], max_results=5000,
                        filter_string=f"tags.optuna_trial_id = '{t._trial_id}' and "
                                      "attributes.status = 'RUNNING'"):
                    tracker.end(run.info.run_id, "KILLED")
                n += 1
    return n


def _worker_entry(job: WorkerJob, budget) -> None:
    """A spawned worker: exit code 0 (all ran), 1 (some trial failed), 130 (stopped)."""
    import torch

    if job.threads:
        torch.set_num_threads(job.threads)
    interrupt_on_sigterm()
    try:
        failures = worker(job, budget=budget)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    sys.exit(1 if failures else 0)


def worker(job: WorkerJob, limit: int | None = None, on_trial=None, budget=None) -> int:
    """Claim and run trials (conditions first, then added estimators) until none waits, or
    ``limit`` ran (``budget``: a shared count for several processes). Returns failures."""
    spec = load_study(job.spec_path)
    store = parse_store_url(job.storage, "Optuna storage", OPTUNA_SCHEMES)
    storage = open_storage(store, job.beat)
    queues = [(optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec)),
               run_trial),
              (optuna.load_study(study_name=added_name(spec.name), storage=storage,
                                 sampler=optuna.samplers.RandomSampler(seed=spec.seeds[0])),
               run_added)]
    tracker = Tracker(spec.name, job.tracking)
    failures = ran = 0
    while (limit is None or ran < limit) and _take(budget):
        claimed = next(((s, t, r) for s, r in queues if (t := claim(s)) is not None), None)
        if claimed is None:
            break
        study, trial, run = claimed
        ran += 1
        trial.set_user_attr("worker", job.worker)
        with Pulse(partial(storage.record_heartbeat, trial._trial_id), job.beat.interval,
                   cleanup=storage.remove_session):
            failures += not _execute(spec, study, trial, run, tracker, job.parent)
        if on_trial:
            on_trial()
    return failures


def _take(budget) -> bool:
    """Take one trial from a shared budget (None or negative: unlimited)."""
    if budget is None:
        return True
    with budget.get_lock():
        if budget.value < 0:
            return True
        if budget.value == 0:
            return False
        budget.value -= 1
        return True


def _note(trial: optuna.Trial, key: str, value: str) -> None:
    """A user attribute on a trial that another process may have finished meanwhile."""
    try:
        trial.set_user_attr(key, value)
    except UpdateFinishedTrialError:
        pass


def _execute(spec: StudySpec, study: optuna.Study, trial: optuna.Trial, run, tracker: Tracker,
             parent: str) -> bool:
    """Run one trial and commit it; False when it failed. A trial that another process failed
    meanwhile (its heartbeat looked stale) is discarded, not counted as a failure."""
    open_runs: list[str] = []
    try:
        values = run(spec, trial, tracker, parent, open_runs)
    except UpdateFinishedTrialError:  # failed by another process while this one ran it
        values = None
    except KeyboardInterrupt:
        ignore_signals()
        _note(trial, "error", "interrupted")
        commit(study, trial, TrialState.FAIL)
        for run_id in open_runs:
            tracker.end(run_id, "KILLED")
        raise
    except Exception as exc:  # the condition failed: record it, go on with the others
        message = f"{type(exc).__name__}: {exc}"
        with deferred_signals():
            _note(trial, "error", message)
            _note(trial, "failed_by", parent)
            commit(study, trial, TrialState.FAIL)
            for run_id in open_runs:
                tracker.client.set_tag(run_id, "error", message)
                tracker.end(run_id, "FAILED")
        print(f"trial {trial.number} failed: {message}", file=sys.stderr)
        return False
    undefined = values is not None and not all(math.isfinite(v) for v in values)
    with deferred_signals():
        committed = False
        if values is not None:
            if undefined:  # recorded as PRUNED: it ran, and is not redone
                _note(trial, "objective", "undefined: a metric divides by zero (e.g. grad J = 0)")
            state = TrialState.PRUNED if undefined else TrialState.COMPLETE
            committed = commit(study, trial, state, None if undefined else values)
        if committed:
            for run_id in reversed(open_runs):  # estimators first, the condition last
                tracker.end(run_id, "FINISHED")
            return True
        for run_id in open_runs:
            tracker.client.set_tag(run_id, "error", "discarded: another process failed this "
                                                    "trial meanwhile (its heartbeat looked stale)")
            tracker.end(run_id, "FAILED")
    print(f"trial {trial.number}: another process failed it meanwhile (its heartbeat looked "
          "stale); the result is discarded and the trial is redone by the next run",
          file=sys.stderr)
    return True
