"""Which objectives a worker may import: decided on the worker's side, never by the storage.

A study's stored definition names its objective, and anyone who can write to the database can
change that definition. A worker therefore imports only what its own side allows:

- the names in ``objectives/__init__.py``'s ``REGISTRY`` (and the ``module:attribute`` targets
  they stand for);
- objectives installed as ``hpo.objectives`` entry points: each entry point's name is usable as an
  objective name, and its value (``module:attribute``) is allowed when written out;
- modules matching a pattern given with ``--allow-objective PATTERN`` or in
  ``HPO_ALLOW_OBJECTIVES`` (comma-separated; ``fnmatch`` patterns on the module path such as
  ``myproj.*`` or ``myproj.models``);
- the module of a study file given on the worker's own command line (the user typed that file).

:meth:`ObjectivePolicy.check` decides before anything is imported; a refusal is one
:class:`~hpo.errors.SpecError` line naming the objective and the fix.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from hpo.errors import SpecError

ENV_VAR = "HPO_ALLOW_OBJECTIVES"
ENTRY_POINT_GROUP = "hpo.objectives"
CLI_FLAG = "--allow-objective"

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ATTRIBUTE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What a module pattern may contain: module-path characters plus fnmatch's * ? [ ] !
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!\-]+$")


def entry_point_objectives() -> dict[str, str]:
    """``name -> module:attribute`` of the installed ``hpo.objectives`` entry points.

    Entry points whose value names no attribute cannot be objectives and are left out. Read on
    every call (cheap), so objectives installed while a process runs are seen.
    """
    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.attr and ep.name not in found:
            found[ep.name] = f"{ep.module}:{ep.attr}"
    return found


def known_objectives() -> dict[str, str]:
    """Every objective name this installation knows: the registry, then entry points (the
    registry wins a name both define)."""
    from objectives import REGISTRY

    return {**entry_point_objectives(), **REGISTRY}


def split_target(target: str, source: str, name: str | None = None) -> tuple[str, str]:
    """``module:attribute`` as ``(module, attribute)``, or a SpecError when it is not one."""
    module, sep, attribute = target.partition(":")
    if not sep or not _MODULE.match(module) or not _ATTRIBUTE.match(attribute):
        shown = name if name is not None else target
        raise SpecError(
            source,
            "objective",
            f"{shown!r} is not a registry name or a module.path:attribute",
            "e.g. objective: digits_mlp or objective: mypackage.models:train",
        )
    return module, attribute


def lookup_target(name: str, source: str) -> str:
    """The ``module:attribute`` an objective name stands for (registry, entry point, or itself).

    No policy is applied here: this is what a study file the user gave resolves to.
    """
    known = known_objectives()
    if name in known:
        target = known[name]
        split_target(target, f"{source} (objective {name!r})")
        return target
    if ":" not in name:
        raise SpecError(
            source,
            "objective",
            f"unknown objective {name!r}",
            f"use one of {', '.join(sorted(known))} (registry or hpo.objectives entry points) "
            "or module.path:attribute",
        )
    split_target(name, source)
    return name


def validate_pattern(pattern: str, origin: str) -> str:
    """A module pattern, stripped, or a SpecError naming ``origin`` (the flag or variable)."""
    text = pattern.strip()
    if not text:
        raise SpecError(
            origin,
            "",
            "empty objective pattern",
            "give a module path or an fnmatch pattern on it, e.g. myproj.models or myproj.*",
        )
    if ":" in text:
        module = text.partition(":")[0].strip() or "myproj.models"
        raise SpecError(
            origin,
            "",
            f"objective pattern {text!r} contains ':'; patterns match module paths, not module:attribute",
            f"use the module path, e.g. {module}",
        )
    if not _PATTERN.match(text):
        raise SpecError(
            origin,
            "",
            f"objective pattern {text!r} is not a module path or an fnmatch pattern on one",
            "use letters, digits, _ and . with * ? [ ] wildcards, e.g. myproj.* (comma-separate several)",
        )
    return text


def _split_patterns(text: str, origin: str) -> list[str]:
    return [validate_pattern(part, origin) for part in text.split(",")]


@dataclass(frozen=True)
class ObjectivePolicy:
    """What a worker allows besides the registry and the ``hpo.objectives`` entry points.

    ``patterns``: fnmatch patterns on module paths (``--allow-objective``, ``HPO_ALLOW_OBJECTIVES``).
    ``trusted``: objectives of study files given on the worker's command line (registry names or
    ``module:attribute``); the module of each trusted ``module:attribute`` is allowed.
    """

    patterns: tuple[str, ...] = ()
    trusted: tuple[str, ...] = ()

    @classmethod
    def from_sources(
        cls,
        cli_patterns: Sequence[str] = (),
        trusted: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> ObjectivePolicy:
        """The policy of a worker: ``--allow-objective`` values (each may be comma-separated),
        ``HPO_ALLOW_OBJECTIVES`` from ``environ`` (default: ``os.environ``; unset or blank means
        none) and the trusted study-file objectives. Malformed patterns are a SpecError."""
        if environ is None:
            import os

            environ = os.environ
        if isinstance(cli_patterns, str):  # one flag value passed bare
            cli_patterns = [cli_patterns]
        if isinstance(trusted, str):
            trusted = [trusted]
        patterns: list[str] = []
        for value in cli_patterns:
            patterns += _split_patterns(value, CLI_FLAG)
        env_value = environ.get(ENV_VAR, "")
        if env_value.strip():
            patterns += _split_patterns(env_value, ENV_VAR)
        return cls(patterns=tuple(dict.fromkeys(patterns)), trusted=tuple(dict.fromkeys(trusted)))

    def trusted_modules(self) -> tuple[str, ...]:
        """Modules of the trusted ``module:attribute`` objectives."""
        known = known_objectives()
        modules = []
        for name in self.trusted:
            target = known.get(name, name)
            module, sep, _ = target.partition(":")
            if sep and _MODULE.match(module):
                modules.append(module)
        return tuple(dict.fromkeys(modules))

    def module_patterns(self) -> tuple[str, ...]:
        """Every module pattern this policy allows (its patterns, then the trusted modules): pass
        each as ``--allow-objective`` to a child worker that does not get the study file."""
        return tuple(dict.fromkeys([*self.patterns, *self.trusted_modules()]))

    def cli_args(self) -> list[str]:
        """``--allow-objective PATTERN`` arguments that give a child worker this policy."""
        args: list[str] = []
        for pattern in self.module_patterns():
            args += [CLI_FLAG, pattern]
        return args

    def allows_module(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) for p in self.module_patterns())

    def check(self, name: str, source: str) -> str:
        """The ``module:attribute`` that objective ``name`` resolves to, or a SpecError when this
        worker does not allow it. Imports nothing."""
        known = known_objectives()
        if name in known:  # a registry name or an installed entry point: the worker's own code
            return lookup_target(name, source)
        target = lookup_target(name, source)  # validates module.path:attribute
        module, _ = split_target(target, source)
        if target in known.values() or self.allows_module(module):
            return target
        raise SpecError(
            source,
            "objective",
            f"{name!r} is not allowed on this worker",
            f"pass {CLI_FLAG} {module} or set {ENV_VAR}={module} on the worker, "
            f"install it as an {ENTRY_POINT_GROUP} entry point, or run the worker with the study file",
        )
