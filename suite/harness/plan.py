"""The plan of a study: what must still run so that each condition, and each estimator on each
condition, has exactly one finished result. Computed and queued while the study's plan lock is
held, from what the storage holds (finished, waiting and running trials), so that any number of
invocations, started in any order, queue each piece of work once.

Two Optuna studies share the storage: ``NAME`` holds one trial per condition (the grid points,
or the search's trials); ``NAME/added`` holds one trial per complete condition whose estimator
list grew (a study file that names more estimators, or ``estimators = "all"`` after the
registry grew): it runs only the missing estimators, on the same seeds, hence the same
trajectories.

A study's *definition* (what its existing results mean: sampler, seeds, fixed condition values,
searched space, objectives) is recorded with it; a study file whose definition differs is
refused, naming the difference (docs/studies.md lists which edits extend a study).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

import estimators

from ..core.errors import InputError
from .study_spec import CONDITION_KEYS, DEFAULTS, Range, StudySpec, fill

__all__ = ["ADDED", "DONE", "Addition", "QueueState", "added_name", "check_definition",
           "chosen_estimators", "definition", "frozen_params", "queue_additions", "queue_conditions",
           "record_definition", "waiting"]

ADDED = "/added"  # suffix of the Optuna study of added estimators
DEFINITION_ATTR = "suite:definition"
DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # PRUNED: ran, but its objective is undefined
TAKEN = (*DONE, TrialState.WAITING, TrialState.RUNNING)


def added_name(name: str) -> str:
    return name + ADDED


@dataclass(frozen=True)
class Addition:
    """Estimators to add to one complete condition."""

    trial: int  # the condition's trial number in the study
    estimators: tuple[str, ...]


@dataclass(frozen=True)
class QueueState:
    waiting: int  # trials waiting in the queue after queueing
    new: int  # trials this call queued


def chosen_estimators(spec: StudySpec, params: dict) -> list:
    """Every estimator a condition runs: the study's list (or the whole registry), the
    objectives' estimators and their baselines; reinforce always (the variance ratio's reference)."""
    names = spec.estimator_names(params)
    if isinstance(names, list):  # not "all"
        names += [fill(o.estimator, params) for o in spec.objectives]
    chosen = estimators.resolve(names)
    extra = [fill(o.baseline, params) for o in spec.objectives]
    chosen += [estimators.get(n) for n in extra if n not in {e.name for e in chosen}]
    return chosen


# ------------------------------------------------------------------------------- definition
def definition(spec: StudySpec) -> dict:
    """What a study's existing results mean; an edit that changes this is not an extension.

    A grid's values may grow (new conditions) or shrink (results kept); its parameters may not
    change. Estimators and a search's number of trials are not part of it: they extend."""
    grid = spec.sampler == "grid"
    return {
        "sampler": spec.sampler,
        "seeds": list(spec.seeds),
        "fixed": {k: spec.fixed.get(k, DEFAULTS.get(k)) for k in CONDITION_KEYS
                  if k not in spec.space},
        "space": {k: ("a list of values" if grid else
                      dataclasses.asdict(v) if isinstance(v, Range) else list(v))
                  for k, v in spec.space.items()},
        "objectives": [dataclasses.asdict(o) for o in spec.objectives],
        "cases": list(spec.cases),  # appended cases extend (a trial names its case by index)
        "estimator_files": {f: _file_hash(f) for f in spec.estimator_files},
    }


def _file_hash(path: str) -> str:
    """An estimator file's content hash: edited code changes what its estimators' results mean."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A definition (JSON values) with its ``fixed`` and ``space`` tables flattened: fixed.gamma."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("fixed", "space"):
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out


def check_definition(study: optuna.Study, spec: StudySpec, where: str) -> None:
    """Refuse a study file whose definition differs from the one the study was run with."""
    recorded = study.user_attrs.get(DEFINITION_ATTR)
    if recorded is None:
        return  # a new study, or one run before definitions were recorded
    before, now = _flat(json.loads(recorded)), _flat(_jsonable(definition(spec)))
    old_cases, new_cases = before.pop("cases", []), now.pop("cases", [])
    if new_cases[:len(old_cases)] == old_cases:  # cases appended (or none): an extension
        old_cases = new_cases
    before["cases"], now["cases"] = old_cases, new_cases
    old_files, new_files = before.get("estimator_files", {}), now.get("estimator_files", {})
    if all(new_files.get(f) == h for f, h in old_files.items()):  # files added: an extension
        before["estimator_files"] = new_files
    for key in sorted(set(before) | set(now), key=lambda k: (k.split(".")[0], k)):
        if before.get(key) != now.get(key):
            shown = lambda v: "not set" if v is None else json.dumps(v)  # noqa: E731
            raise InputError(
                f"{spec.path}: {_where(key)} is {shown(now.get(key))}, but study '{spec.name}' in "
                f"{where} was run with {shown(before.get(key))}; that changes what its results "
                f"mean: give the study a new name (study.name) or rerun with --start-over to "
                f"discard its results")


def _where(key: str) -> str:
    head, _, rest = key.partition(".")
    if head in ("fixed", "space"):
        return f"{head}.{rest}"
    return {"objectives": "[[objectives]]", "cases": "[[cases]] (edited, not appended)",
            "estimator_files": "study.estimator_file (or a file's content)"}.get(head,
                                                                              f"study.{head}")


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def record_definition(study: optuna.Study, spec: StudySpec) -> None:
    study.set_user_attr(DEFINITION_ATTR, json.dumps(_jsonable(definition(spec)), sort_keys=True))


# ----------------------------------------------------------------------------------- queues
def params_key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def frozen_params(t: FrozenTrial) -> dict:
    """A frozen trial's parameters: sampled ones, or the queued values of a grid point."""
    return t.params or t.system_attrs.get("fixed_params", {})


def queue_conditions(study: optuna.Study, spec: StudySpec, limit: int | None) -> QueueState:
    """Queue the conditions the plan still needs (grid points without a done, waiting or
    running trial; or the search trials left). Call it holding the plan lock."""
    trials = study.get_trials(deepcopy=False)
    taken = [t for t in trials if t.state in TAKEN]
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    if spec.sampler == "grid":
        seen = {params_key(frozen_params(t)) for t in taken}
        todo = [p for p in spec.grid() if params_key(p) not in seen]
    else:
        assert spec.trials is not None  # load_study: a search names its number of trials
        todo = [{}] * max(0, spec.trials - len(taken))
    if limit is not None:
        todo = todo[: max(0, limit - waiting)]
    for params in todo:
        study.enqueue_trial(params, skip_if_exists=False)
    return QueueState(waiting + len(todo), len(todo))


def queue_additions(study: optuna.Study, added: optuna.Study, spec: StudySpec,
                    recorded: Callable[[FrozenTrial], set[str] | None]) -> list[Addition]:
    """Queue, for each done condition, the estimators it now needs and has no result, waiting
    or running trial for. ``recorded(trial)`` gives a trial's finished estimators when the
    trial does not say (trials of older versions); None when unknown. Hold the plan lock."""
    covered: dict[int, set[str]] = {}
    for t in added.get_trials(deepcopy=False):
        if t.state in TAKEN:
            covered.setdefault(t.user_attrs["trial"], set()).update(t.user_attrs["estimators"])
    out = []
    for t in study.get_trials(deepcopy=False, states=DONE):
        have = t.user_attrs.get("estimators")
        have = set(have) if have is not None else recorded(t)
        if have is None or "mlflow_run_id" not in t.user_attrs:
            continue
        params = frozen_params(t)
        missing = [e.name for e in chosen_estimators(spec, params)
                   if e.name not in have and e.name not in covered.get(t.number, set())]
        if missing:
            added.enqueue_trial(params, user_attrs={
                "trial": t.number, "estimators": missing, "device": t.user_attrs.get("device"),
                "condition_run": t.user_attrs["mlflow_run_id"]}, skip_if_exists=False)
            out.append(Addition(t.number, tuple(missing)))
    return out


def waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
