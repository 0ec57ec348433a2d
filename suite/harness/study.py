"""The Optuna driver: a study file's conditions become trials; each trial measures every
estimator on the same trajectories for each seed, aggregates across seeds and logs to MLflow.

Trial allocation is a queue in the Optuna storage: this process enqueues the trials the plan still
needs (grid points without a finished trial, or the number of search trials left), and every
worker pops them atomically, so N workers (or several machines on one PostgreSQL storage) run
each trial exactly once. Rerunning a study resumes it: complete trials are never redone; failed
or interrupted ones are.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

import estimators

from ..core.errors import InputError
from ..core.metrics import by_name, verdict
from ..core.sampler import resolve_device
from ..core.stats import block_factors
from .exact_table import exact_rows
from .measure import MIN_BATCHES, Measurement, check_sizes, measure, statistics
from .problem import make_problem
from .progress import Progress
from .study_spec import Objective, Range, StudySpec, fill, load_study
from .tracking import Tracker, environment_tags, flatten_stats, tracking_uri

__all__ = ["StudyOutcome", "default_storage", "pool_seeds", "run_study"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class StudyOutcome:
    name: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    complete: int  # trials complete in the storage after this invocation
    failed_now: int  # trials that failed in this invocation
    out_dir: Path
    experiment_id: str = ""  # the study's MLflow experiment


def default_storage(spec: StudySpec, out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'optuna.db').resolve()}"


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    seed = spec.seeds[0]
    return {
        "grid": lambda: optuna.samplers.RandomSampler(seed=seed),  # params come from the queue
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[spec.sampler]()


def _directions(spec: StudySpec) -> list[str]:
    # a grid study's value: how many estimators' verdicts contradict their claims
    return [o.direction for o in spec.objectives] or ["minimize"]


def open_storage(url: str) -> optuna.storages.BaseStorage | str:
    """SQLite storages wait up to a minute for a lock (several workers write to one file)."""
    if url.startswith("sqlite:"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return url


def _open_study(spec: StudySpec, storage: str) -> optuna.Study:
    try:
        return optuna.create_study(study_name=spec.name, storage=open_storage(storage),
                                   load_if_exists=True, directions=_directions(spec),
                                   sampler=make_sampler(spec))
    except ValueError as exc:  # e.g. the same name with other directions
        raise InputError(f"Optuna storage {storage}: {exc}") from None


def _params_key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _enqueue(study: optuna.Study, spec: StudySpec, limit: int | None, fail_running: bool) -> int:
    """Queue the trials the plan still needs; return how many are waiting now."""
    trials = study.get_trials(deepcopy=False)
    if fail_running:
        for t in trials:
            if t.state == TrialState.RUNNING:
                study.tell(t.number, state=TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
    busy = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.WAITING,
                                             TrialState.RUNNING)]
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    if spec.sampler == "grid":
        seen = {_params_key(t.params or t.system_attrs.get("fixed_params", {})) for t in busy}
        todo = [p for p in spec.grid() if _params_key(p) not in seen]
    else:
        todo = [{}] * max(0, spec.trials - len(busy))
    if limit is not None:
        todo = todo[: max(0, limit - waiting)]
    for params in todo:
        study.enqueue_trial(params)
    return waiting + len(todo)


def _pop(study: optuna.Study) -> optuna.Trial | None:
    """The next waiting trial, claimed atomically (the first half of Study.ask), or None."""
    study._thread_local.cached_all_trials = None
    trial_id = study._pop_waiting_trial_id()
    return None if trial_id is None else optuna.Trial(study, trial_id)


def _suggest(trial: optuna.Trial, space: dict) -> dict:
    params = {}
    for key, spec in space.items():
        if isinstance(spec, Range):
            suggest = trial.suggest_int if spec.int else trial.suggest_float
            low, high = (int(spec.low), int(spec.high)) if spec.int else (spec.low, spec.high)
            params[key] = suggest(key, low, high, log=spec.log)
        else:
            params[key] = trial.suggest_categorical(key, spec)
    return params


def exact_only(estimators, sol, exact) -> dict[str, dict]:
    """Rows for a condition with no sampling (trajectories = 0): the claim and the exact block;
    an estimator without exact moments has no numbers here."""
    return {e.name: {"claims_unbiased": e.claims_unbiased(sol.gamma), "condition": e.condition,
                     "rejects_unbiased": None, "exact": exact[e.name].to_json(), "agreement": {}}
            for e in estimators}


def pool_seeds(results: list[Measurement], estimators, sol, exact) -> dict[str, dict]:
    """One set of statistics from several seeds' rollouts of a condition: their sums are added
    (the seeds' batches are independent), so there is one test and one interval per estimator."""
    totals = {}
    for name in results[0].totals:
        pooled = results[0].totals[name].empty_like()
        for r in results:
            pooled.merge(r.totals[name])
        totals[name] = pooled
    stats, _ = statistics(totals, estimators, sol, exact, seed=0)
    for row in stats.values():
        row["n_seeds"] = len(results)
        row["ci_resamples"] = ("groups of batches" if len(results) == 1
                               else f"groups of batches, {len(results)} seeds pooled")
    return stats


def objective_value(obj: Objective, agg: dict[str, dict], params: dict, batch_size: int) -> float:
    row = agg[fill(obj.estimator, params)]
    metric = by_name(obj.metric)
    if metric.name in ("variance_ratio", "exact_variance_ratio") and obj.baseline != "reinforce":
        other = agg[fill(obj.baseline, params)]
        variance = by_name(metric.name.replace("_ratio", ""))
        return variance.read(row) / variance.read(other)
    value = metric.read(row)
    if metric.per_batch_size:
        value = (value or {}).get(batch_size)
    return math.nan if value is None else float(value)


_SHORT = {"gamma": "γ", "horizon": "H", "trajectories": "N", "batch_size": "B"}


def condition_label(spec: StudySpec, params: dict) -> str:
    """What sets a trial apart: its searched parameters, with a case's values in place of its
    index, 'Taxi-v4 | uniform | γ=0.99 | H=50' (the environment alone when nothing varies)."""
    cond = spec.condition(params)
    items = []
    for key, value in sorted(params.items(), key=lambda kv: kv[0] == "seed"):  # the seed last
        items += ([(k, cond.get(k, v)) for k, v in spec.cases[value].items()]
                  if key == "case" and spec.cases else [(key, value)])
    parts = []
    for key, value in items:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(text if key in ("env", "policy") else f"{_SHORT.get(key, key)}={text}")
    return " | ".join(parts) or str(cond["env"])


# what a trial costs beyond its sampling (exact solution and moments, MLflow runs), in steps: in
# the default study an exact-only trial (trajectories = 0) took 0.4 of a 20,000 x 50-step one
TRIAL_WORK = 750_000


def trial_work(spec: StudySpec, params: dict) -> float | None:
    """What a trial costs, in trajectory steps: trajectories x horizon x seeds, plus TRIAL_WORK
    (None while its parameters are not known)."""
    try:
        cond = spec.condition(params)
        steps = float(cond["trajectories"]) * float(cond["horizon"]) * len(spec.seeds_for(params))
        return steps + TRIAL_WORK
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _label(spec: StudySpec, params: dict) -> str:
    try:
        return condition_label(spec, params)
    except (KeyError, TypeError, ValueError, IndexError):  # a search trial that failed early
        return ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"


def run_trial(spec: StudySpec, trial: optuna.Trial, tracker: Tracker, parent: str,
              open_runs: list[str]) -> list[float]:
    """One condition: exact solution, one rollout per seed, every estimator, MLflow records."""
    params = _suggest(trial, spec.space)
    cond = spec.condition(params)
    names = spec.estimator_names(params)
    names = names if names == "all" else names + [fill(o.estimator, params) for o in spec.objectives]
    chosen = estimators.resolve(names)
    extra = [fill(o.baseline, params) for o in spec.objectives]
    chosen += [estimators.get(n) for n in extra if n not in {e.name for e in chosen}]
    sampled = cond["trajectories"] > 0  # 0: exact moments only
    if sampled:
        check_sizes(cond["trajectories"], cond["batch_size"], chosen)
    elif cond["batch_size"] < 2 and any(e.needs_batch for e in chosen):
        check_sizes(cond["batch_size"] * MIN_BATCHES, cond["batch_size"], chosen)  # the B rule
    problem = make_problem(cond["env"], cond["policy"], cond["gamma"], cond["horizon"], cache=True)
    mdp, policy, sol = problem.mdp, problem.policy, problem.solution
    free = {k: v for k, v in params.items() if k not in cond}
    run = tracker.start(f"trial {trial.number}: {cond['env']} | {cond['policy']} | gamma "
                        f"{cond['gamma']:g} | H {cond['horizon']}", parent,
                        tags={"kind": "condition", "trial": trial.number, "study": spec.name},
                        params={**cond, **free, "seeds": list(spec.seeds_for(params)),
                                "n_params": policy.n_params})
    open_runs.append(run)
    trial.set_user_attr("mlflow_run_id", run)
    started = time.perf_counter()
    results = []
    M = cond["trajectories"] // cond["batch_size"]
    exact = exact_rows(mdp, policy, sol, chosen, cond["batch_size"],
                       tuple(block_factors(M, cond["batch_size"])) if sampled else (1,),
                       directions=sampled, shared_start=cond["shared_start"])
    for seed in spec.seeds_for(params) if sampled else ():
        results.append(measure(mdp, policy, sol, chosen, cond["trajectories"], cond["batch_size"],
                               seed, spec.device, exact=exact, shared_start=cond["shared_start"]))
    steps = sum(r.n_steps for r in results)
    agg = pool_seeds(results, chosen, sol, exact) if sampled else exact_only(chosen, sol, exact)
    label = condition_label(spec, params)
    for est in chosen:  # top-level runs: a UI filter returns them without their parents
        row = agg[est.name]
        est_run = tracker.start(f"{est.name} | {label}", tags={
            "kind": "estimator", "study": spec.name, "trial": trial.number,
            "condition_run": run, "invocation_run": parent},
            params={**cond, **free, "estimator": est.name, "condition": label,
                    "claims_unbiased": row["claims_unbiased"],
                    "seeds": len(spec.seeds_for(params))})
        open_runs.append(est_run)
        tracker.log(est_run, {"exact/J": sol.J, "exact/grad_norm": sol.grad_norm,
                              **flatten_stats(row)})
        tracker.end(est_run)
        open_runs.pop()
    verdicts = {n: verdict(r["exact"].get("rel_bias"), r["rejects_unbiased"])[0]
                for n, r in agg.items()}
    violations = sum((v == "biased") == bool(agg[n]["claims_unbiased"])
                     for n, v in verdicts.items() if v != "inconclusive")
    values = ([objective_value(o, agg, params, cond["batch_size"]) for o in spec.objectives]
              or [float(violations)])
    metrics = {"exact/J": sol.J, "exact/grad_norm": sol.grad_norm, "run/seconds":
               time.perf_counter() - started, "run/steps": steps, "claims/violations": violations}
    metrics.update({f"objective/{i}": v for i, v in enumerate(values)})
    tracker.log(run, metrics)
    tracker.log_json(run, {"condition": cond, "params": params, "J": sol.J,
                           "grad_norm": sol.grad_norm, "aggregate": agg,
                           "per_seed": [r.stats for r in results]},
                     "stats.json")
    tracker.end(run)
    open_runs.pop()
    return values


def _raise_interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C
    raise KeyboardInterrupt


def worker(spec_path: str, storage: str, parent: str, uri: str, limit: int | None = None,
           on_trial=None) -> int:
    """Pop and run trials until the queue is empty (or ``limit`` ran). Returns failures."""
    spec = load_study(spec_path)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    study = optuna.load_study(study_name=spec.name, storage=open_storage(storage),
                              sampler=make_sampler(spec))
    tracker = Tracker(spec.name, uri)
    failures = ran = 0
    while limit is None or ran < limit:
        trial = _pop(study)
        if trial is None:
            break
        ran += 1
        open_runs: list[str] = []
        try:
            values = run_trial(spec, trial, tracker, parent, open_runs)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            for run in open_runs:
                tracker.end(run, "KILLED")
            raise
        except Exception as exc:  # the condition failed: record it, go on with the others
            failures += 1
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            for run in open_runs:
                tracker.client.set_tag(run, "error", f"{type(exc).__name__}: {exc}")
                tracker.end(run, "FAILED")
            print(f"trial {trial.number} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            study.tell(trial, values)
        if on_trial:
            on_trial()
    return failures


def _worker_entry(args, threads: int) -> int:
    import torch

    torch.set_num_threads(threads)  # the machine's cores shared between the worker processes
    try:
        return worker(*args)
    except KeyboardInterrupt:
        return -1


def run_study(path: str | Path, storage: str | None = None, workers: int = 1,
              trials: int | None = None, out_dir: str | Path | None = None,
              fail_running: bool = False, progress: bool = True) -> StudyOutcome:
    """Run (or resume) the study in ``path``; see the module doc."""
    spec = load_study(path)
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if trials is not None and trials < 1:
        raise InputError(f"--trials must be >= 1, got {trials}")
    device = str(resolve_device(spec.device))
    out = Path(out_dir) if out_dir else Path("results") / spec.name
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(spec, out)
    study = _open_study(spec, storage)
    queued = _enqueue(study, spec, trials, fail_running)
    uri = tracking_uri()
    tracker = Tracker(spec.name, uri)
    parent = tracker.start(f"{spec.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                           tags={"kind": "invocation", "study": spec.name,
                                 "study_sha256": spec.sha256, "optuna_storage": storage,
                                 "sampler": spec.sampler, **environment_tags(device)},
                           params={"workers": workers, "queued_trials": queued,
                                   "study_file": str(spec.path)})
    tracker.log_file(parent, spec.path)
    before = _finished(study)
    follow = Progress(spec.name, study.get_trials(deepcopy=False, states=(TrialState.WAITING,)),
                      trials, lambda p: trial_work(spec, p), lambda p: _label(spec, p),
                      enabled=progress)
    try:
        if workers == 1:
            failed = worker(str(spec.path), storage, parent, uri, trials,
                            on_trial=lambda: follow.update(study.get_trials(deepcopy=False)))
        else:
            failed = _run_workers(spec, storage, parent, uri, workers, follow, study)
    except KeyboardInterrupt:
        tracker.end(parent, "KILLED")
        raise
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    finally:
        follow.close()
    complete = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    tracker.log(parent, {"trials/complete": complete, "trials/failed_now": failed,
                         "trials/finished_now": _finished(study) - before})
    tracker.end(parent, "FINISHED" if failed == 0 else "FAILED")
    return StudyOutcome(spec.name, storage, uri, parent, complete, failed, out,
                        tracker.experiment_id)


def _finished(study: optuna.Study) -> int:
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _run_workers(spec, storage, parent, uri, workers, follow: Progress, study) -> int:
    """N spawned processes on the same storage; a worker that dies abruptly raises
    BrokenProcessPool here instead of leaving the pool waiting forever."""
    from concurrent.futures import ProcessPoolExecutor, wait

    args = (str(spec.path), storage, parent, uri)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        threads = max(1, (os.cpu_count() or 1) // workers)
        futures = [pool.submit(_worker_entry, args, threads) for _ in range(workers)]
        while wait(futures, timeout=1.0)[1]:
            follow.update(study.get_trials(deepcopy=False))
        codes = [f.result() for f in futures]
    follow.update(study.get_trials(deepcopy=False))
    if any(c < 0 for c in codes):
        raise KeyboardInterrupt
    return sum(codes)
