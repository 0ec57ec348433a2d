"""Study files: TOML data describing the conditions to explore. Loaded and validated here.

    [study]       name, description, sampler, trials, seeds, device, estimators, estimator_file
    [space]       searched parameters: a list (choices) or a table {low, high, log, int};
                  `seed = [0, 1, ...]` makes each seed a trial of its own
    [fixed]       condition values that do not vary; strings may use {param} templates
    [[cases]]     condition values that vary together (each case a table); a grid runs each
    [[objectives]]  metric, estimator, (baseline), direction   -- searches only

See docs/studies.md for the schema. Every error names the file, the key, the rule and the value.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeGuard

import estimators as registry

from ..core.envs import make_mdp
from ..core.errors import InputError, did_you_mean
from ..core.metrics import METRICS as TABLE
from ..core.specs import parse_spec
from .estimator_files import load_estimator_files
from .problem import POLICY_KINDS

__all__ = ["CONDITION_KEYS", "METRICS", "SAMPLERS", "Objective", "Range", "StudySpec",
           "check_study_name", "load_study"]

SAMPLERS = ("grid", "random", "tpe", "cmaes", "nsga2")
CONDITION_KEYS = ("env", "policy", "gamma", "horizon", "trajectories", "batch_size", "shared_start")
DEFAULTS = {"policy": "uniform", "trajectories": 10_000, "batch_size": 10, "shared_start": False}
STUDY_KEYS = ("name", "description", "sampler", "trials", "seeds", "device", "estimators",
              "estimator_file")
OBJECTIVE_KEYS = ("metric", "estimator", "baseline", "direction")
# per-estimator metrics an objective may name: those of the metric table with a direction
METRICS = tuple(m.name for m in TABLE if m.direction is not None)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# a template's format spec: what a number needs, [width][.precision][type], width and precision
# below 100 (e.g. {lam:.3g}, {n:03d}); fill, alignment, sign and conversions are refused
_FORMAT_SPEC = re.compile(r"^[0-9]{0,2}(\.[0-9]{1,2})?[defgEG%]?$")


@dataclass(frozen=True)
class Range:
    """A searched numeric parameter: uniform (or log-uniform) on [low, high]."""

    low: float
    high: float
    log: bool = False
    int: bool = False


Direction = Literal["minimize", "maximize"]


@dataclass(frozen=True)
class Objective:
    metric: str  # one of METRICS
    estimator: str  # may contain {param} templates
    direction: Direction
    baseline: str = "reinforce"  # the reference of variance_ratio


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    sampler: str
    trials: int | None  # None for grid: every grid point
    seeds: tuple[int, ...]
    device: str
    estimators: tuple[str, ...] | str  # names (may use templates) or "all"
    space: dict[str, list | Range]  # parameter -> choices or range
    fixed: dict[str, object]  # condition key -> value (strings may use templates)
    objectives: tuple[Objective, ...] = ()
    cases: tuple[dict, ...] = ()  # condition values that vary together; space["case"] indexes
    description: str = ""
    estimator_files: tuple[str, ...] = ()  # user files whose estimators load_study registered
    text: str = field(default="", repr=False)  # the file, verbatim

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def grid(self) -> list[dict]:
        """Every combination of the space's choices (grid sampler), in the order the trials run:
        each next point is one whose values have run least so far (ties: the first key varying
        fastest), so that every stretch of trials mixes the environments, horizons, ... alike,
        and early results and the progress estimate represent the whole study."""
        points: list[dict] = [{}]
        for key, values in reversed(self.space.items()):
            if isinstance(values, Range):  # load_study allows ranges in searches only
                raise ValueError(f"space.{key} is a range: a search has no grid")
            points = [{key: v, **p} for p in points for v in values]
        if len(points) > 2000:  # the balancing below is quadratic
            return points
        ran: dict[tuple, int] = {}
        order = []
        while points:
            i = min(range(len(points)), key=lambda i: sum(ran.get((k, repr(v)), 0)
                                                          for k, v in points[i].items()))
            order.append(points.pop(i))
            for k, v in order[-1].items():
                ran[k, repr(v)] = ran.get((k, repr(v)), 0) + 1
        return order

    def condition(self, params: dict) -> dict:
        """The condition of a trial: the space's values, else the trial's case, else the fixed
        values (templates filled), else the defaults."""
        case = self.cases[params["case"]] if self.cases else {}
        out = {}
        for key in CONDITION_KEYS:
            value = params[key] if key in params else case.get(
                key, self.fixed.get(key, DEFAULTS.get(key)))
            out[key] = fill(value, params)
        return out

    def seeds_for(self, params: dict) -> tuple[int, ...]:
        """The trial's seeds: its own when the space has a seed parameter, else the study's."""
        return (int(params["seed"]),) if "seed" in params else self.seeds

    def estimator_names(self, params: dict) -> list[str] | Literal["all"]:
        if self.estimators == "all":
            return "all"
        return [fill(e, params) for e in self.estimators]


class _Filler(string.Formatter):
    """str.format where a float without a format spec prints short (0.1, not 0.1000000000000001)."""

    def format_field(self, value, format_spec: str) -> str:
        if not format_spec and isinstance(value, float):
            return f"{value:.6g}"
        return super().format_field(value, format_spec)


def fill(value, params: dict):
    """'gae:lambda={lam}' with params {'lam': 0.5} -> 'gae:lambda=0.5'; '{lam:.2f}' -> '0.50'
    (non-strings unchanged)."""
    if not isinstance(value, str):
        return value
    try:
        return _Filler().format(value, **params)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"template '{value}' cannot be filled with {params}: {exc}") from None


def _fail(path: Path, key: str, rule: str, value) -> InputError:
    return InputError(f"{path}: {key}: {rule}, got {value!r}")


def check_study_name(name) -> None:
    """A study's name is also a folder and an MLflow experiment: a plain, short name."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"study name must be 1 to 100 letters, digits, '.', '_' or '-', starting "
                         f"with a letter or digit, got {name!r}; name a study file or a study")


def _check_keys(path: Path, section: str, table: dict, allowed) -> None:
    for key in table:
        if key not in allowed:
            raise InputError(f"{path}: unknown key '{section}{key}'"
                             f"{did_you_mean(key, allowed)} allowed: {', '.join(allowed)}")


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file; raise InputError naming the file, key, rule and value."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"study file '{path}' does not exist") from None
    except IsADirectoryError:
        raise InputError(f"study file '{path}' is a folder; name a .toml file, e.g. "
                         "studies/default.toml") from None
    except PermissionError:
        raise InputError(f"study file '{path}' cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); save the study file as "
                         "UTF-8") from None
    except OSError as exc:
        raise InputError(f"study file '{path}' cannot be read ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    _check_keys(path, "", data, ("study", "space", "fixed", "objectives", "cases"))
    study = data.get("study")
    if not isinstance(study, dict):
        raise InputError(f"{path}: missing table [study] (with at least name = \"...\")")
    _check_keys(path, "study.", study, STUDY_KEYS)
    name = study.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(path, "study.name", "must be 1 to 100 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit", name)
    sampler = study.get("sampler", "grid")
    if sampler not in SAMPLERS:
        raise InputError(f"{path}: study.sampler: unknown sampler '{sampler}'"
                         f"{did_you_mean(str(sampler), SAMPLERS)} known: {', '.join(SAMPLERS)}")
    trials = study.get("trials")
    if sampler == "grid":
        if trials is not None:
            raise _fail(path, "study.trials", "a grid study runs every grid point; remove trials",
                        trials)
    elif not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise _fail(path, "study.trials", f"the {sampler} sampler needs an integer >= 1", trials)
    seeds = study.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise _fail(path, "study.seeds", "must be a non-empty list of distinct integers >= 0",
                    seeds)
    device = study.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise _fail(path, "study.device", "must be auto, cpu or cuda", device)
    estimators = study.get("estimators", "all")
    if estimators != "all" and (not isinstance(estimators, list) or not estimators
                                or not all(isinstance(e, str) for e in estimators)):
        raise _fail(path, "study.estimators", "must be \"all\" or a non-empty list of names",
                    estimators)

    files = study.get("estimator_file", [])
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise _fail(path, "study.estimator_file", "must be a path or a list of paths",
                    study.get("estimator_file"))
    try:
        load_estimator_files(files)
    except InputError as exc:
        raise InputError(f"{path}: study.estimator_file: {exc}") from None

    space = _load_space(path, data.get("space", {}), sampler)
    fixed = data.get("fixed", {})
    if not isinstance(fixed, dict):
        raise _fail(path, "fixed", "must be a table", fixed)
    _check_keys(path, "fixed.", fixed, CONDITION_KEYS)
    cases = _load_cases(path, data.get("cases", []), space, fixed)
    if cases:
        if "case" in space:
            raise _fail(path, "space.case", "is the index of [[cases]]; rename the parameter",
                        space["case"])
        space = {**space, "case": list(range(len(cases)))}
    if "seed" in space and (not isinstance(space["seed"], list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in space["seed"])):
        raise _fail(path, "space.seed", "must be a list of integers >= 0 (one trial per seed)",
                    space["seed"])
    for key in CONDITION_KEYS:
        if key in space and key in fixed:
            raise InputError(f"{path}: '{key}' is both in [space] and [fixed]; keep one")
        in_cases = bool(cases) and all(key in c for c in cases)
        if key not in space and key not in fixed and key not in DEFAULTS and not in_cases:
            raise InputError(f"{path}: '{key}' is not given; put it in [fixed] (one value), "
                             f"[space] (values to explore) or every [[cases]] table")
    for key, value in fixed.items():
        _check_value(path, f"fixed.{key}", key, value)
    for key, values in space.items():
        if key in CONDITION_KEYS and isinstance(values, list):
            for v in values:
                _check_value(path, f"space.{key}", key, v)
        elif key in CONDITION_KEYS and key in ("env", "policy"):
            raise _fail(path, f"space.{key}", "must be a list of choices", values)
    objectives = _load_objectives(path, data.get("objectives", []), sampler)
    free = [k for k in space if k not in CONDITION_KEYS and k not in ("case", "seed")]
    templated = [v for v in [*fixed.values(), *(estimators if estimators != "all" else []),
                             *(o.estimator for o in objectives)] if isinstance(v, str)]
    templated += [v for vs in space.values() if isinstance(vs, list) for v in vs
                  if isinstance(v, str)]
    used = _template_fields(path, templated)
    for f in used:
        if f not in space:
            raise InputError(f"{path}: template '{{{f}}}' names no parameter of [space]"
                             f"{did_you_mean(f, list(space))} parameters: {', '.join(space) or 'none'}")
    for f in free:
        if f not in used:
            raise InputError(f"{path}: space.{f}: a parameter that is neither a condition key "
                             f"({', '.join(CONDITION_KEYS)}) nor used as {{{f}}} in a template")
    _check_names(path, fixed, space, estimators, objectives, cases)
    return StudySpec(name=name, path=path, sampler=sampler, trials=trials, seeds=tuple(seeds),
                     device=device, estimators=estimators if estimators == "all" else tuple(estimators),
                     space=space, fixed=fixed, objectives=objectives, cases=cases,
                     description=str(study.get("description", "")), text=text,
                     estimator_files=tuple(files))


def _load_cases(path: Path, cases, space: dict, fixed: dict) -> tuple[dict, ...]:
    """[[cases]]: tables of condition values that vary together."""
    if not isinstance(cases, list) or not all(isinstance(c, dict) and c for c in cases):
        raise _fail(path, "cases", "must be an array of non-empty tables ([[cases]])", cases)
    for i, case in enumerate(cases):
        _check_keys(path, f"cases[{i}].", case, CONDITION_KEYS)
        for key, value in case.items():
            if key in space or key in fixed:
                raise InputError(f"{path}: '{key}' is both in [[cases]] and "
                                 f"[{'space' if key in space else 'fixed'}]; keep one")
            _check_value(path, f"cases[{i}].{key}", key, value)
    if len({repr(sorted(c.items())) for c in cases}) != len(cases):
        raise _fail(path, "cases", "must be distinct", cases)
    return tuple(cases)


def _template_fields(path: Path, templates: list[str]) -> set[str]:
    """The parameters the templates use; each field must be {name} or {name:SPEC} with SPEC
    what a number needs ([width][.precision][type], width and precision below 100)."""
    used = set()
    for text in templates:
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text)
                      if f is not None]
        except ValueError as exc:
            raise InputError(f"{path}: template '{text}': {exc}; write {{name}} for a parameter "
                             "and {{{{ }}}} for a literal brace") from None
        for f, spec, conv in fields:
            if not f.isidentifier():
                raise InputError(f"{path}: template '{text}': '{{{f}}}' must name a parameter, "
                                 "e.g. {lam}")
            if conv or not _FORMAT_SPEC.match(spec or ""):
                shown = f"!{conv}" if conv else f":{spec}"
                raise InputError(f"{path}: template '{text}': format '{shown}' is not allowed; "
                                 f"a number needs at most [width][.precision][type] with width "
                                 f"and precision below 100, e.g. {{{f}:.3g}}")
            used.add(f)
    return used


def _check_names(path: Path, fixed: dict, space: dict, estimators, objectives,
                 cases: tuple[dict, ...] = ()) -> None:
    """Environments, policy kinds and estimators without templates must exist."""
    def values(key):
        if key in fixed:
            return [(f"fixed.{key}", fixed[key])]
        return ([(f"space.{key}", v) for v in space.get(key, []) if isinstance(space[key], list)]
                + [(f"cases[{i}].{key}", c[key]) for i, c in enumerate(cases) if key in c])

    for where, env in values("env"):
        if "{" not in env:
            try:
                make_mdp(env)
            except InputError as exc:
                raise InputError(f"{path}: {where}: {exc}") from None
    for where, pol in values("policy"):
        kind = parse_spec(pol)[0]
        if "{" not in pol and not pol.endswith(".npy") and kind not in POLICY_KINDS:
            raise InputError(f"{path}: {where}: unknown policy '{kind}'"
                             f"{did_you_mean(kind, POLICY_KINDS)} known: {', '.join(POLICY_KINDS)}")
    names = [] if estimators == "all" else [("study.estimators", e) for e in estimators]
    names += [(f"objectives[{i}].estimator", o.estimator) for i, o in enumerate(objectives)]
    names += [(f"objectives[{i}].baseline", o.baseline) for i, o in enumerate(objectives)]
    for where, name in names:
        if "{" not in name:
            try:
                registry.get(name)
            except InputError as exc:
                raise InputError(f"{path}: {where}: {exc}") from None


def _is_number(x: object) -> TypeGuard[int | float]:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _load_space(path: Path, space, sampler: str) -> dict[str, list | Range]:
    if not isinstance(space, dict):
        raise _fail(path, "space", "must be a table", space)
    out: dict[str, list | Range] = {}
    for key, spec in space.items():
        where = f"space.{key}"
        if isinstance(spec, list):
            if not spec or len({repr(v) for v in spec}) != len(spec):
                raise _fail(path, where, "must list distinct values", spec)
            out[key] = spec
        elif isinstance(spec, dict):
            if sampler == "grid":
                raise _fail(path, where, "the grid sampler needs a list of values, not a range",
                            spec)
            _check_keys(path, where + ".", spec, ("low", "high", "log", "int"))
            low, high = spec.get("low"), spec.get("high")
            if not (_is_number(low) and _is_number(high)):
                raise _fail(path, where, "a range needs numbers low and high", spec)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise _fail(path, where, "a range needs finite low < high", spec)
            if spec.get("log") and low <= 0:
                raise _fail(path, where, "a log range needs low > 0", spec)
            is_int = bool(spec.get("int", key in ("horizon", "trajectories", "batch_size")))
            out[key] = Range(float(low), float(high), bool(spec.get("log", False)), is_int)
        else:
            raise _fail(path, where, "must be a list of values or a table {low, high}", spec)
    return out


def _check_value(path: Path, where: str, key: str, value) -> None:
    if key in ("env", "policy"):
        if not isinstance(value, str) or not value:
            raise _fail(path, where, "must be a non-empty string", value)
    elif key == "gamma":
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
            raise _fail(path, where, "must be a number in [0, 1]", value)
    elif key == "trajectories":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _fail(path, where, "must be an integer >= 0 (0: exact moments only, no "
                        "sampling)", value)
    elif key == "shared_start":
        if not isinstance(value, bool):
            raise _fail(path, where, "must be true or false", value)
    else:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(path, where, "must be an integer >= 1", value)


def _load_objectives(path: Path, objectives, sampler: str) -> tuple[Objective, ...]:
    if sampler == "grid":
        if objectives:
            raise InputError(f"{path}: [[objectives]] are for searches; a grid study has none")
        return ()
    if not isinstance(objectives, list) or not objectives:
        raise InputError(f"{path}: the {sampler} sampler needs at least one [[objectives]] "
                         "table (metric, estimator, direction)")
    out = []
    for i, obj in enumerate(objectives):
        where = f"objectives[{i}]"
        if not isinstance(obj, dict):
            raise _fail(path, where, "must be a table", obj)
        _check_keys(path, where + ".", obj, OBJECTIVE_KEYS)
        metric = obj.get("metric")
        if metric not in METRICS:
            raise InputError(f"{path}: {where}.metric: unknown metric '{metric}'"
                             f"{did_you_mean(str(metric), METRICS)} known: {', '.join(METRICS)}")
        estimator = obj.get("estimator")
        if not isinstance(estimator, str) or not estimator:
            raise _fail(path, where + ".estimator", "must name an estimator", estimator)
        direction = obj.get("direction")
        if direction not in ("minimize", "maximize"):
            raise _fail(path, where + ".direction", "must be minimize or maximize", direction)
        out.append(Objective(metric, estimator, direction, obj.get("baseline", "reinforce")))
    if sampler == "nsga2" and len(out) < 2:
        raise InputError(f"{path}: the nsga2 sampler is multi-objective: give two or more "
                         f"[[objectives]], got {len(out)}")
    if sampler == "cmaes" and len(out) > 1:
        raise InputError(f"{path}: the cmaes sampler optimises one objective, got {len(out)}; "
                         "use nsga2 for several")
    return tuple(out)
