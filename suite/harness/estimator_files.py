"""A user's Python file of estimators: ``--estimator-file PATH`` and the study key
``estimator_file``.

The file is imported once per process (loading it again returns the same names). It registers
estimators in either of two ways:

* with the registry's decorator, ``from estimators import register`` and ``@register(...)`` on a
  function of a ``Context`` (docs/estimators.md), or ``estimators.groups.advantage`` for an
  advantage with a loss aggregation mode;
* as a plain function with the signature LLM frameworks use, ``(token_level_rewards,
  response_mask, group_index) -> advantages``, which ``estimators.frameworks`` wraps (registered
  under the function's name, with ``NAME:agg=MODE`` variants).

A file that does not exist, fails to import, defines no estimator, reuses a registered name or
returns advantages of the wrong shape on a probe batch raises InputError (one line), and
registers nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

from estimators.frameworks import SIGNATURE, register_framework_function, takes_framework_signature
from estimators.registry import FAMILIES, REGISTRY

from ..core.errors import InputError

__all__ = ["load_estimator_file", "load_estimator_files"]

_LOADED: dict[Path, list[str]] = {}


def load_estimator_files(paths) -> list[str]:
    """load_estimator_file for each path (a string or a list of them); the names, in order."""
    items = [paths] if isinstance(paths, str | Path) else list(paths or [])
    return [name for p in items for name in load_estimator_file(p)]


def load_estimator_file(path: str | Path) -> list[str]:
    """Import ``path`` and register the estimators it defines; return their names."""
    resolved = Path(path).resolve()
    if resolved in _LOADED:
        return _LOADED[resolved]
    if not resolved.is_file():
        raise InputError(f"estimator file '{path}' does not exist")
    before, before_families = set(REGISTRY), set(FAMILIES)
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module_name = f"_suite_user_estimators_{digest}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, resolved)
        if spec is None or spec.loader is None:  # not a name Python imports (no .py)
            raise InputError(f"estimator file '{path}' is not a Python file (*.py)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up
        try:
            spec.loader.exec_module(module)
        except InputError:
            raise
        except ValueError as exc:
            if "registered twice" in str(exc):
                raise InputError(f"estimator file '{path}': {exc}; rename it") from None
            raise InputError(f"estimator file '{path}' failed to import: {_error(exc, resolved)}") from None
        except Exception as exc:  # the user's code: any error becomes one line
            raise InputError(f"estimator file '{path}' failed to import: {_error(exc, resolved)}") from None
        names = [n for n in REGISTRY if n not in before]
        plain = [fn for fn in vars(module).values()
                 if inspect.isfunction(fn) and fn.__module__ == module_name
                 and takes_framework_signature(fn)]
        for fn in plain:
            names += register_framework_function(fn, f"estimator file '{path}'")
        if not names:
            raise InputError(f"estimator file '{path}' defines no estimator: decorate a function "
                             f"of a Context with estimators.register(...), or define a function "
                             f"({', '.join(SIGNATURE)}) -> advantages")
    except BaseException:
        sys.modules.pop(module_name, None)
        for key in set(REGISTRY) - before:
            del REGISTRY[key]
        for key in set(FAMILIES) - before_families:
            del FAMILIES[key]
        raise
    _LOADED[resolved] = names
    return names


def _error(exc: Exception, file: Path) -> str:
    """'NameError: name 'x' is not defined (line 3)' for an exception raised by the file."""
    line = ""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(file):
            line = f" (line {tb.tb_lineno})"
        tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        line = f" (line {exc.lineno})"
        return f"SyntaxError: {exc.msg}{line}"
    return f"{type(exc).__name__}: {exc}{line}"
