"""Checking the paths and report flags of ``hpo compare`` / ``report`` / ``tabulate`` up front.

A comparison or a tabulated grid can take hours; a typo in ``-o`` must be refused before that work
starts, as one line naming the flag and the fix, not as a traceback after it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from hpo.errors import HpoError

# the files a report writes into its folder (PNG images only without --no-png)
REPORT_FILES = ("results.json", "report.md", "report.html")


def shown(path: str | Path) -> str:
    """``path`` for a one-line message: a very long one is cut."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-40:]}"


def _nearest_existing(path: Path, flag: str, fix: str) -> Path:
    """The nearest ancestor of ``path`` that exists (``path`` itself if it does), which must be a
    writable folder unless it is ``path``; every missing part must be a valid name."""
    current = path
    while True:
        try:
            current.stat()
            break
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            pass  # some ancestor is a file: found below
        except OSError as exc:  # a name too long, a loop of links, no permission to look
            raise HpoError(
                f"{flag} {shown(path)}: cannot use this path: {exc.strerror} (fix: {fix})"
            ) from None
        if current.parent == current:
            break
        current = current.parent
    max_name = _max_name_length(current if current.is_dir() else current.parent)
    for part in path.parts:
        if len(os.fsencode(part)) > max_name:
            raise HpoError(
                f"{flag} {shown(path)}: the name {shown(part)} is longer than the {max_name} bytes a "
                f"file name may have (fix: {fix})"
            )
    return current


def _max_name_length(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _check_creatable(path: Path, flag: str, fix: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a folder this user can write."""
    ancestor = _nearest_existing(path, flag, fix)
    if not ancestor.is_dir():
        raise HpoError(f"{flag} {shown(path)}: {shown(ancestor)} is a file, not a folder (fix: {fix})")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise HpoError(
            f"{flag} {shown(path)}: cannot create it, {shown(ancestor)} is not writable (fix: {fix})"
        )


def _existing(given: str | Path, flag: str, fix: str, kind: str) -> Path | None:
    """``given`` as a path when it exists (the caller checks what it is); None when it does not
    and can be created; :class:`HpoError` when it is empty or cannot be created."""
    if not str(given):
        raise HpoError(f"{flag}: the {kind} name is empty (fix: {fix})")
    path = Path(given)
    if _nearest_existing(path, flag, fix) != path:
        _check_creatable(path, flag, fix)
        return None
    return path


def check_output_dir(given: str | Path, flag: str = "-o", contents: Iterable[str] = REPORT_FILES) -> None:
    """Raise :class:`HpoError` unless ``path`` is, or can be created as, a writable folder into which
    the files ``contents`` can be written."""
    fix = "name a folder that this user can write, e.g. -o reports/NAME"
    path = _existing(given, flag, fix, "folder")
    if path is None:
        return
    if not path.is_dir():
        raise HpoError(f"{flag} {shown(path)}: is a file, not a folder (fix: {fix})")
    if not os.access(path, os.W_OK | os.X_OK):
        raise HpoError(f"{flag} {shown(path)}: the folder is not writable (fix: {fix})")
    for name in contents:
        inside = path / name
        if inside.is_dir():
            raise HpoError(
                f"{flag} {shown(path)}: {shown(inside)} is a folder, but the report writes a file there "
                f"(fix: {fix})"
            )
        if inside.exists() and not os.access(inside, os.W_OK):
            raise HpoError(
                f"{flag} {shown(path)}: cannot overwrite {shown(inside)}, it is not writable (fix: {fix})"
            )


def check_output_file(given: str | Path, flag: str = "-o", example: str = "storage/tables/NAME.json") -> None:
    """Raise :class:`HpoError` unless ``path`` is, or can be created as, a writable file."""
    fix = f"name a file that this user can write, e.g. {flag} {example}"
    path = _existing(given, flag, fix, "file")
    if path is None:
        return
    if path.is_dir():
        raise HpoError(
            f"{flag} {shown(path)}: is a folder, not a file "
            f"(fix: {fix}, or {shown(path / Path(example).name)})"
        )
    if not os.access(path, os.W_OK):
        raise HpoError(f"{flag} {shown(path)}: the file is not writable (fix: {fix})")


def parse_axes(text: str | None) -> tuple[str, ...]:
    """The parameter names of ``--axes`` (empty when not given)."""
    if text is None:
        return ()
    axes = tuple(a.strip() for a in text.split(","))
    if not any(axes):
        raise HpoError("--axes: no parameter named (fix: name two, e.g. --axes lr,batch_size)")
    if not all(axes):
        raise HpoError(
            f"--axes {text}: an empty name (fix: two names separated by a comma, e.g. lr,batch_size)"
        )
    return axes


def check_target(target: float | None) -> None:
    """``--target`` must be a metric value a run can reach: a finite number."""
    if target is not None and not math.isfinite(target):
        raise HpoError(
            f"--target: must be a finite metric value, got {target} (fix: e.g. --target 0.1, or drop it "
            "to use the reference's median final best)"
        )


def check_report_flags(
    axes: Sequence[str],
    target: float | None,
    reference: str | None,
    params: Sequence[str],
    samplers: Sequence[str],
) -> None:
    """Raise :class:`HpoError` for report flags that cannot work with this comparison (the
    parameters of its search space, ``params``, and its ``samplers``); ``reference`` is None when
    the default (random search) is used."""
    check_target(target)
    if reference is not None and reference not in samplers:
        raise HpoError(
            f"--reference: {reference!r} is not an algorithm of this comparison (fix: use one of "
            f"{', '.join(samplers)})"
        )
    names = ", ".join(params)
    if axes:
        for name in axes:
            if name not in params:
                raise HpoError(f"--axes: {name!r} is not a parameter (fix: use names from {names})")
        if len(axes) > 2:
            raise HpoError(f"--axes: names {len(axes)} parameters, a plot has two (fix: name two of {names})")
        if len(axes) == 2 and axes[0] == axes[1]:
            raise HpoError(f"--axes: {axes[0]!r} named twice (fix: name two different parameters of {names})")
        if len(axes) == 1 and len(params) > 1:
            others = [n for n in params if n != axes[0]]
            raise HpoError(
                f"--axes: names one parameter, the plot needs two (fix: e.g. --axes {axes[0]},{others[0]})"
            )
