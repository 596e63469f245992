"""``hpo dashboard``'s flags (the command is :func:`hpo.dashboard.cmd_dashboard`)."""

from __future__ import annotations

import argparse

from hpo._commands import ENV_ARTIFACT_DIR, lazy_command
from hpo._storage_url import add_storage_argument

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hpo dashboard`` to the CLI."""
    p = subparsers.add_parser(
        "dashboard",
        help="watch studies live in optuna-dashboard (trials, every metric's curves, study definitions)",
        description="Start optuna-dashboard on the study storage, with the trials' artifact store.",
    )
    add_storage_argument(p)
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 exposes it)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--artifact-dir",
        default=None,
        help=f"folder of the trials' artifacts (default ${ENV_ARTIFACT_DIR}, then storage/artifacts)",
    )
    p.set_defaults(func=lazy_command("hpo.dashboard", "cmd_dashboard"))
