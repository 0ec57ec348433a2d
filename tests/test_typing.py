"""The packages are typed: each ships its py.typed marker, and mypy (`nox -s lint`) checks them."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("suite", "estimators", "reports")


def test_every_package_ships_its_py_typed_marker():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    for package in PACKAGES:
        assert (ROOT / package / "py.typed").is_file(), package
        assert "py.typed" in package_data.get(package, []), package
    assert config["tool"]["mypy"]["files"] == list(PACKAGES)
