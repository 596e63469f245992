"""The argparse definitions of the commands whose code lives in heavy modules, import-light.

``hpo COMMAND --help`` builds only the command's parser; the modules here import nothing but the
standard library and other light ``hpo`` modules (no Optuna, SQLAlchemy, pydantic, SciPy, gRPC,
torch or plotly), so the help of every command is as quick as ``optuna --help``. Each command's
run function is :func:`lazy_command`: it imports the module that does the work when it runs.

Defaults shown in the help that the heavy modules also use are defined here and imported by them
(or, for modules owned elsewhere, checked equal by a test).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]
# hpo.artifacts.ENV_ARTIFACT_DIR, which imports Optuna (a test checks they agree).
ENV_ARTIFACT_DIR = "HPO_ARTIFACT_DIR"


def lazy_command(module: str, name: str) -> Command:
    """The function ``module.name``, imported when the command runs (not when its parser is built)."""

    def run(args: argparse.Namespace) -> int:
        command: Command = getattr(importlib.import_module(module), name)
        return command(args)

    run.__qualname__ = run.__name__ = name
    return run


def check_heartbeat_flags(args: argparse.Namespace) -> None:
    """One-line errors for ``--heartbeat-interval``, ``--grace-period`` and ``--max-retry``."""
    from hpo.errors import HpoError

    if args.heartbeat_interval < 1 or args.grace_period <= args.heartbeat_interval:
        raise HpoError("--grace-period must exceed --heartbeat-interval, and both must be >= 1 second")
    if args.max_retry < 0:
        raise HpoError(
            f"--max-retry must be 0 or more, got {args.max_retry} (fix: e.g. --max-retry 3; 0 never retries)"
        )


def add_retry_arguments(p: argparse.ArgumentParser) -> None:
    """``--grace-period`` and ``--max-retry``: when a silent trial's worker counts as dead, and how
    often its trial is retried (``hpo worker`` and ``hpo serve-storage`` share them)."""
    p.add_argument(
        "--grace-period",
        type=int,
        default=30,
        help="seconds without heartbeat before a trial is failed and retried (default 30)",
    )
    p.add_argument(
        "--max-retry", type=int, default=3, help="retries of a trial whose worker died (default 3)"
    )
