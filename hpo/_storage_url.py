"""The ``--storage`` flag and its resolution, without importing Optuna or SQLAlchemy.

Kept apart from :mod:`hpo.storage` so that building the command line (``hpo --help``) stays
cheap; :mod:`hpo.storage` re-exports every name here.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_STORAGE = "sqlite:///storage/hpo.db"
ENV_STORAGE = "OPTUNA_STORAGE"


def resolve_storage_url(cli_value: str | None) -> str:
    """``--storage`` wins, then ``$OPTUNA_STORAGE``, then the SQLite default under ``storage/``."""
    if cli_value:
        return cli_value
    return os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE


def add_storage_argument(parser: argparse.ArgumentParser, *, grpc: bool = True, note: str = "") -> None:
    """The ``--storage`` flag every command shares; resolve it with :func:`resolve_storage_url`."""
    what = "SQLAlchemy URL of the study database"
    if grpc:
        what += " (or grpc://HOST:PORT for hpo serve-storage)"
    parser.add_argument(
        "--storage", default=None, help=f"{what}. Defaults to ${ENV_STORAGE}, then {DEFAULT_STORAGE}{note}"
    )
