"""constraints.txt (the tested versions `make` installs) agrees with pyproject.toml and with the
environment the tests run in."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pinned() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"not an exact pin: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(specifiers[0].version)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def test_every_dependency_is_pinned_inside_the_range_pyproject_declares() -> None:
    pins = pinned()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, (
            f"{requirement.name} is a dependency but constraints.txt has no pin (fix: make lock)"
        )
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement} (fix: make lock)"
        )


def test_the_tests_run_on_the_pinned_versions() -> None:
    # What CI passes with is what a fresh clone installs; a dependency of another version here
    # means the environment was not made by `make` (or constraints.txt changed since).
    pins = pinned()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        installed = Version(importlib.metadata.version(name))
        assert installed == pins[name], f"{name} {installed} is installed, constraints.txt pins {pins[name]}"
