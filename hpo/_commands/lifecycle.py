"""``hpo extend``, ``hpo enqueue`` and ``hpo delete-study``'s flags (the commands are in
:mod:`hpo.lifecycle`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpo._commands import ENV_ARTIFACT_DIR, lazy_command
from hpo._storage_url import add_storage_argument

DEFAULT_CHECKPOINT_ROOT = Path("storage/checkpoints")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hpo extend``, ``hpo enqueue`` and ``hpo delete-study`` to the CLI."""
    p = subparsers.add_parser(
        "extend", help="queue N more trials of a study (its stored n_trials grows by N)"
    )
    p.add_argument("study_name")
    p.add_argument("--n-trials", type=int, required=True, help="how many trials to add")
    add_storage_argument(p, grpc=False)
    p.set_defaults(func=lazy_command("hpo.lifecycle", "cmd_extend"))

    p = subparsers.add_parser(
        "enqueue", help="run known configurations next (they take the oldest empty queued slots)"
    )
    p.add_argument("study_name")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--params", default=None, help="a configuration as JSON, e.g. '{\"lr\": 0.01}'")
    group.add_argument(
        "--from",
        dest="from_file",
        default=None,
        metavar="FILE",
        help="YAML/JSON: a mapping or a list of them",
    )
    add_storage_argument(p, grpc=False)
    p.set_defaults(func=lazy_command("hpo.lifecycle", "cmd_enqueue"))

    p = subparsers.add_parser("delete-study", help="delete a study, its checkpoints and its artifacts")
    p.add_argument("study_name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true", help="delete even while trials are RUNNING")
    p.add_argument(
        "--checkpoint-dir",
        default=str(DEFAULT_CHECKPOINT_ROOT),
        help=f"where the study's trials checkpoint (default {DEFAULT_CHECKPOINT_ROOT})",
    )
    p.add_argument(
        "--artifact-dir",
        default=None,
        help=f"folder of the trials' artifacts (default ${ENV_ARTIFACT_DIR}, then storage/artifacts)",
    )
    add_storage_argument(p, grpc=False)
    p.set_defaults(func=lazy_command("hpo.lifecycle", "cmd_delete_study"))
