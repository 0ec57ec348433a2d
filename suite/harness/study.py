"""Trials of a study: a condition's trial computes every estimator's exact moments, measures
them on the same trajectories for each seed, pools the seeds and logs to MLflow; an *added*
trial measures only the estimators a complete condition lacks (same seeds and device, so the
same trajectories) and logs them under that condition's run.

A trial leaves its MLflow runs RUNNING: the caller (``suite.harness.runner``) commits the trial
to Optuna first and closes the runs FINISHED only once the commit succeeded, so a result appears
as FINISHED exactly when its trial is COMPLETE.
"""

from __future__ import annotations

import math
import time

import optuna

import estimators

from ..core.metrics import by_name
from ..core.sampler import resolve_device
from ..core.stats import block_factors
from .estimator_stats import EstimatorStats
from .exact_table import exact_rows
from .measure import MIN_BATCHES, Measurement, check_sizes, measure, statistics
from .plan import chosen_estimators
from .problem import make_problem
from .study_spec import Direction, Objective, Range, StudySpec, fill
from .tracking import Tracker, flatten_stats

__all__ = ["TRIAL_WORK", "check_condition_sizes", "condition_label", "directions", "exact_only",
           "make_sampler", "objective_value", "pool_seeds", "run_added", "run_trial", "trial_params",
           "trial_label", "trial_work"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    seed = spec.seeds[0]
    return {
        "grid": lambda: optuna.samplers.RandomSampler(seed=seed),  # params come from the queue
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[spec.sampler]()


def directions(spec: StudySpec) -> list[Direction]:
    # a grid study's value: how many estimators' verdicts contradict their claims
    return [o.direction for o in spec.objectives] or ["minimize"]


def trial_params(trial: optuna.Trial, spec: StudySpec, fixed: bool = False) -> dict:
    """The trial's parameters: a grid point (or an added trial's condition) as queued; a search
    trial's sampled by Optuna. Queued values are not registered as Optuna distributions, so a
    grid may gain values between runs (Optuna refuses a categorical whose choices change)."""
    if fixed or spec.sampler == "grid":
        return dict(trial.study._storage.get_trial(trial._trial_id).system_attrs
                    .get("fixed_params", {}))
    params = {}
    for key, space in spec.space.items():
        if isinstance(space, Range):
            params[key] = (trial.suggest_int(key, int(space.low), int(space.high), log=space.log)
                           if space.int else
                           trial.suggest_float(key, space.low, space.high, log=space.log))
        else:
            params[key] = trial.suggest_categorical(key, space)
    return params


def exact_only(estimators, sol, exact) -> dict[str, EstimatorStats]:
    """Statistics of a condition with no sampling (trajectories = 0): the claim and the exact
    block; an estimator without exact moments has no numbers here."""
    return {e.name: EstimatorStats(e.claims_unbiased(sol.gamma), e.condition, exact[e.name])
            for e in estimators}


def pool_seeds(results: list[Measurement], estimators, sol, exact) -> dict[str, EstimatorStats]:
    """One set of statistics from several seeds' rollouts of a condition: their sums are added
    (the seeds' batches are independent), so there is one test and one interval per estimator."""
    totals = {}
    for name in results[0].totals:
        pooled = results[0].totals[name].empty_like()
        for r in results:
            pooled.merge(r.totals[name])
        totals[name] = pooled
    stats, _ = statistics(totals, estimators, sol, exact, seed=0, n_seeds=len(results))
    return stats


def objective_value(obj: Objective, agg: dict[str, EstimatorStats], params: dict,
                    batch_size: int) -> float:
    """The objective's metric for its estimator, read from the stats.json row as the metric
    table says (the variance ratio against another baseline: the ratio of the two rows')."""
    row = agg[fill(obj.estimator, params)].to_json()
    metric = by_name(obj.metric)
    if metric.name in ("variance_ratio", "exact_variance_ratio") and obj.baseline != "reinforce":
        other = agg[fill(obj.baseline, params)].to_json()
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


def trial_label(spec: StudySpec, params: dict) -> str:
    """condition_label, or the raw parameters when they make no condition (a failed search)."""
    try:
        return condition_label(spec, params)
    except (KeyError, TypeError, ValueError, IndexError):  # a search trial that failed early
        return ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"


def run_trial(spec: StudySpec, trial: optuna.Trial, tracker: Tracker, parent: str,
              open_runs: list[str]) -> list[float]:
    """One condition: exact solution, one rollout per seed, every estimator, MLflow records
    (left RUNNING in ``open_runs``, the condition's run first)."""
    params = trial_params(trial, spec)
    cond = spec.condition(params)
    chosen = chosen_estimators(spec, params)
    check_condition_sizes(cond, chosen)
    problem = make_problem(cond["env"], cond["policy"], cond["gamma"], cond["horizon"], cache=True)
    policy, sol = problem.policy, problem.solution
    free = {k: v for k, v in params.items() if k not in cond}
    run = tracker.start(f"trial {trial.number}: {cond['env']} | {cond['policy']} | gamma "
                        f"{cond['gamma']:g} | H {cond['horizon']}", parent,
                        tags={"kind": "condition", "trial": trial.number, "study": spec.name,
                              "optuna_trial_id": trial._trial_id},
                        params={**cond, **free, "seeds": list(spec.seeds_for(params)),
                                "n_params": policy.n_params})
    open_runs.append(run)
    trial.set_user_attr("mlflow_run_id", run)
    started = time.perf_counter()
    agg, results = _measure(spec, problem, chosen, cond, params, spec.device)
    steps = sum(r.n_steps for r in results)
    log_estimators(tracker, spec, chosen, agg, cond, free, params, sol, run, parent, open_runs,
                   {"trial": trial.number, "optuna_trial_id": trial._trial_id})
    violations = _violations(agg, [e.name for e in chosen])
    values = ([objective_value(o, agg, params, cond["batch_size"]) for o in spec.objectives]
              or [float(violations)])
    metrics = {"exact/J": sol.J, "exact/grad_norm": sol.grad_norm, "run/seconds":
               time.perf_counter() - started, "run/steps": steps, "claims/violations": violations}
    metrics.update({f"objective/{i}": v for i, v in enumerate(values)})
    tracker.log(run, metrics)
    tracker.log_json(run, {"condition": cond, "params": params, "J": sol.J,
                           "grad_norm": sol.grad_norm, "aggregate": _rows(agg),
                           "per_seed": [_rows(r.stats) for r in results]},
                     "stats.json")
    trial.set_user_attr("estimators", [e.name for e in chosen])
    trial.set_user_attr("device", resolve_device(spec.device).type)  # added estimators reuse it
    return values


def run_added(spec: StudySpec, trial: optuna.Trial, tracker: Tracker, parent: str,
              open_runs: list[str]) -> list[float]:
    """Estimators added to a complete condition: measured on the condition's seeds and device
    (the same trajectories; reinforce comes along as the variance ratio's reference) and logged
    under the condition's run. Returns how many of their verdicts contradict their claims."""
    params = trial_params(trial, spec, fixed=True)
    cond = spec.condition(params)
    names = list(trial.user_attrs["estimators"])
    chosen = estimators.resolve(names)
    check_condition_sizes(cond, chosen)
    problem = make_problem(cond["env"], cond["policy"], cond["gamma"], cond["horizon"], cache=True)
    free = {k: v for k, v in params.items() if k not in cond}
    # the condition's device: the same seed draws other trajectories on another device type
    agg, _ = _measure(spec, problem, chosen, cond, params,
                      trial.user_attrs.get("device") or spec.device)
    log_estimators(tracker, spec, [e for e in chosen if e.name in names], agg, cond, free, params,
                   problem.solution, trial.user_attrs["condition_run"], parent, open_runs,
                   {"trial": trial.user_attrs["trial"], "added_by": parent,
                    "optuna_trial_id": trial._trial_id})
    return [float(_violations(agg, names))]


def check_condition_sizes(cond: dict, chosen) -> None:
    """N and B suit the estimators (N = 0: exact moments only, B still checked)."""
    if cond["trajectories"] > 0:
        check_sizes(cond["trajectories"], cond["batch_size"], chosen)
    elif cond["batch_size"] < 2 and any(e.needs_batch for e in chosen):
        check_sizes(cond["batch_size"] * MIN_BATCHES, cond["batch_size"], chosen)  # the B rule


def _rows(stats: dict[str, EstimatorStats]) -> dict[str, dict[str, object]]:
    """Estimator name -> its row of stats.json."""
    return {name: s.to_json() for name, s in stats.items()}


def _measure(spec: StudySpec, problem, chosen, cond: dict, params: dict,
             device: str) -> tuple[dict[str, EstimatorStats], list[Measurement]]:
    """Exact moments of every chosen estimator, then one rollout per seed (none when the
    condition asks for 0 trajectories); the seeds' statistics pooled, and each rollout's."""
    mdp, policy, sol = problem.mdp, problem.policy, problem.solution
    sampled = cond["trajectories"] > 0  # 0: exact moments only
    M = cond["trajectories"] // cond["batch_size"]
    exact = exact_rows(mdp, policy, sol, chosen, cond["batch_size"],
                       tuple(block_factors(M, cond["batch_size"])) if sampled else (1,),
                       directions=sampled, shared_start=cond["shared_start"])
    results = [measure(mdp, policy, sol, chosen, cond["trajectories"], cond["batch_size"], seed,
                       device, exact=exact, shared_start=cond["shared_start"])
               for seed in (spec.seeds_for(params) if sampled else ())]
    agg = pool_seeds(results, chosen, sol, exact) if sampled else exact_only(chosen, sol, exact)
    return agg, results


def _violations(agg: dict[str, EstimatorStats], names: list[str]) -> int:
    """How many of these estimators' verdicts contradict their claims (inconclusive ones aside)."""
    verdicts = {n: agg[n].verdict()[0] for n in names}
    return sum((v == "biased") == bool(agg[n].claims_unbiased)
               for n, v in verdicts.items() if v != "inconclusive")


def log_estimators(tracker: Tracker, spec: StudySpec, chosen, agg: dict[str, EstimatorStats],
                   cond: dict, free: dict, params: dict, sol, condition_run: str,
                   invocation_run: str, open_runs: list[str], tags: dict) -> None:
    """One MLflow run per estimator, naming its condition's run, left RUNNING in ``open_runs``."""
    label = condition_label(spec, params)
    for est in chosen:  # top-level runs: a UI filter returns them without their parents
        row = agg[est.name]
        est_run = tracker.start(f"{est.name} | {label}", tags={
            "kind": "estimator", "study": spec.name, "condition_run": condition_run,
            "invocation_run": invocation_run, **tags},
            params={**cond, **free, "estimator": est.name, "condition": label,
                    "claims_unbiased": row.claims_unbiased,
                    "seeds": len(spec.seeds_for(params))})
        open_runs.append(est_run)
        tracker.log(est_run, {"exact/J": sol.J, "exact/grad_norm": sol.grad_norm,
                              **flatten_stats(row)})
