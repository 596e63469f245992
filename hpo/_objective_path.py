"""Where ``module:attribute`` objectives are looked for besides the installed packages.

A user's objective usually lives in their own project, next to the study file
(``objective: myproj.model:OBJECTIVE``) and not installed. hpo looks for such a module, when the
installed packages (``sys.path``) do not have it, in the *objective path*:

- for a study file given on the command line: the study file's folder, the folder above it (so
  that ``studies/my.yaml`` next to ``myproj/`` works), then the current directory;
- otherwise (``hpo worker --study-name``, ``hpo retrain``): the current directory only;
- plus every ``--objective-path DIR`` given to the command.

Only the user's side chooses these folders: a study's stored definition names a module, never a
folder (:func:`hpo.spec.spec_from_definition`), and whether that module may be imported at all is
decided by :class:`hpo.policy.ObjectivePolicy` before anything is looked up. The folders go to
the trainer process in its job message (:class:`hpo.trainer.TrialJob`), to ``--gpus`` child
workers as ``--objective-path`` flags and to Ray trials in their job
(:class:`hpo.ray_backend._trainable.RayJob`).

The folders are *appended* to ``sys.path`` when a module is not found without them, so they never
shadow the standard library or an installed package of the same name.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

from hpo.errors import SpecError

CLI_FLAG = "--objective-path"


def objective_path(study_file: str | Path | None = None, extra: Iterable[str | Path] = ()) -> tuple[str, ...]:
    """The folders searched for an objective module (absolute, existing, without repeats).

    With ``study_file``: its folder, the folder above it, the current directory; without: the
    current directory. ``extra`` folders (``--objective-path``) come last.
    """
    folders: list[Path] = []
    if study_file is not None:
        folder = Path(study_file).expanduser().resolve().parent
        folders += [folder, folder.parent]
    folders.append(Path.cwd())
    folders += [Path(f).expanduser().resolve() for f in extra]
    return tuple(dict.fromkeys(str(f) for f in folders if f.is_dir()))


def _top_level_found(module_name: str) -> bool:
    top = module_name.partition(".")[0]
    if top in sys.modules:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _extend_sys_path(folders: Sequence[str]) -> None:
    added = False
    for folder in folders:
        if folder not in sys.path:
            sys.path.append(folder)  # appended: never shadows the stdlib or installed packages
            added = True
    if added:
        importlib.invalidate_caches()


def import_objective_module(module_name: str, folders: Sequence[str], source: str) -> ModuleType:
    """Import ``module_name`` (an allowed objective's module), looking in ``folders`` when the
    installed packages lack it. A module that cannot be found is one :class:`SpecError` naming
    ``source``, the ``objective`` field, the folders searched and the fix."""
    if folders and not _top_level_found(module_name):
        _extend_sys_path(folders)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if not (module_name == missing or module_name.startswith(f"{missing}.")):
            # The module was found, but something it imports is not installed.
            raise SpecError(
                source,
                "objective",
                f"importing {module_name!r} failed: {exc}",
                f"install the package that provides {missing!r} in this environment",
            ) from None
        raise SpecError(source, "objective", *_not_found(module_name, missing, folders)) from None


def _not_found(module_name: str, missing: str, folders: Sequence[str]) -> tuple[str, str]:
    top = module_name.partition(".")[0]
    where = ", ".join(_shown(f) for f in folders) if folders else "no folder"
    if missing != top:
        # The package exists (e.g. myproj/) but not the submodule (myproj/model.py).
        path = module_name.replace(".", "/")
        return (
            f"cannot import module {module_name!r}: no {missing!r} "
            f"(looked in {where} and the installed packages)",
            f"check the module path; {path}.py must exist in the package",
        )
    return (
        f"cannot import module {module_name!r}: no package or module {top!r} in {where} "
        "or the installed packages",
        f"put {top}/ (or {top}.py) in the study file's folder or the folder above it, run from the "
        f"folder that holds it, pass {CLI_FLAG} DIR, or install it (pip install -e .)",
    )


def _shown(folder: str) -> str:
    """A folder as the user would write it: relative to the current directory when below it."""
    try:
        relative = os.path.relpath(folder)
    except ValueError:
        return folder
    if relative == ".":
        return "the current directory"
    return relative if not relative.startswith("..") else folder


def cli_args(folders: Sequence[str]) -> list[str]:
    """``--objective-path DIR`` arguments that give a child worker these folders."""
    args: list[str] = []
    for folder in folders:
        args += [CLI_FLAG, folder]
    return args


def add_objective_path_argument(parser: argparse.ArgumentParser) -> None:
    """``--objective-path DIR`` (repeatable) for commands that import an objective."""
    parser.add_argument(
        CLI_FLAG,
        action="append",
        default=[],
        metavar="DIR",
        help="also look for module:attribute objectives in DIR (repeatable; a study file's folder, "
        "the folder above it and the current directory are searched anyway)",
    )
