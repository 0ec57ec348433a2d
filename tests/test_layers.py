"""The layers are real: no module imports one above it, no import cycle, no function-local import
of a project module (the usual way to hide a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("suite", "estimators", "reports")
# lowest first; a module may import its own layer and the ones before it
LAYERS = (
    ("core", ("suite.core",)),
    ("estimators", ("estimators",)),
    ("harness", ("suite.harness",)),
    ("reports", ("reports",)),
    ("command line", ("suite.cli", "suite.__main__", "suite.bench", "suite")),
)


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(module: str, source: str, is_package: bool) -> list[tuple[str, bool, int]]:
    """(imported project module, at module level?, line) for every import in source."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    top_level |= {id(n) for s in tree.body if isinstance(s, ast.If | ast.Try) for n in ast.walk(s)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] if node.module else [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                out.append((name, id(node) in top_level, node.lineno))
    return out


def check(files: dict[str, tuple[str, bool]]) -> list[str]:
    """Violations in {module: (source, is_package)}: imports upwards, local imports, cycles."""
    problems, graph = [], {}
    for module, (source, is_package) in files.items():
        graph[module] = set()
        for target, top, line in project_imports(module, source, is_package):
            if not top:
                problems.append(f"{module}:{line} imports {target} inside a function")
            if layer_of(target) > layer_of(module):
                problems.append(f"{module}:{line} imports {target}, a higher layer "
                                f"({LAYERS[layer_of(target)][0]} above {LAYERS[layer_of(module)][0]})")
            while target not in files and "." in target:  # `from pkg import name`
                target = target.rpartition(".")[0]
            if target in files and target != module:
                graph[module].add(target)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                problems.append("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return problems


def project_files() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py")
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_no_import_goes_up_a_layer_and_none_hides_a_cycle():
    assert check(project_files()) == []


def test_core_is_a_folder_of_its_own():
    core = {m for m in project_files() if m.startswith("suite.core.")}
    assert {"suite.core.mdp", "suite.core.exact", "suite.core.sampler", "suite.core.contraction",
            "suite.core.stats", "suite.core.policies"} <= core


@pytest.mark.parametrize("files, expected", [
    ({"suite.core.a": ("from suite.harness import study\n", False),
      "suite.harness.study": ("", False)}, "a higher layer"),
    ({"suite.core.a": ("def f():\n    from . import b\n", False),
      "suite.core.b": ("", False)}, "inside a function"),
    ({"suite.core.a": ("from .b import x\n", False),
      "suite.core.b": ("from .a import y\n", False)}, "import cycle"),
    ({"estimators.x": ("import reports\n", False), "reports": ("", True)}, "a higher layer"),
])
def test_the_checker_catches_each_kind_of_violation(files, expected):
    problems = check(files)
    assert any(expected in p for p in problems), problems
