"""``hpo serve-storage``'s flags (the command is :func:`hpo.serve_storage.cmd_serve_storage`)."""

from __future__ import annotations

import argparse

from hpo._commands import add_retry_arguments, lazy_command
from hpo._storage_url import add_storage_argument

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 13000


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hpo serve-storage`` to the CLI."""
    p = subparsers.add_parser(
        "serve-storage",
        help="serve the study database to many workers through Optuna's gRPC storage proxy",
        description="Run Optuna's gRPC storage proxy in front of the study database; workers then "
        "use --storage grpc://HOST:PORT. Worth it from a few hundred worker processes on.",
    )
    add_storage_argument(p, grpc=False)
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 for workers on other machines)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--heartbeat-interval",
        type=int,
        default=10,
        help="seconds between checks for trials whose worker died (default 10)",
    )
    add_retry_arguments(p)
    p.add_argument("--threads", type=int, default=16, help="threads answering workers' calls (default 16)")
    p.set_defaults(func=lazy_command("hpo.serve_storage", "cmd_serve_storage"))
