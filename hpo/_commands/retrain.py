"""``hpo retrain``'s flags (the command is :func:`hpo.retrain.cmd_retrain`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpo._commands import lazy_command
from hpo._objective_path import add_objective_path_argument
from hpo._storage_url import add_storage_argument

DEFAULT_OUTPUT_ROOT = Path("storage/retrain")  # hpo.retrain.DEFAULT_OUTPUT_ROOT (a test checks they agree)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hpo retrain`` to the CLI."""
    p = subparsers.add_parser(
        "retrain",
        help="train the best configuration(s) of a study for longer, record full curves, save the models",
        description="Train the K best trials' configurations (or the trials named with --trial) for N "
        "epochs (no pruning, no early stopping), record their learning curves in STUDY_NAME/retrain "
        "and save the final models.",
    )
    p.add_argument("study_name", help="the searched study")
    p.add_argument("--epochs", type=int, required=True, help="epochs to train each configuration, e.g. 40")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--top", type=int, default=1, help="retrain the K best trials (default 1)")
    which.add_argument(
        "--trial",
        type=int,
        action="append",
        metavar="N",
        help="retrain trial N's configuration instead, whatever its state (repeatable); its model is "
        "artifact:STUDY_NAME#trialN",
    )
    add_storage_argument(p)
    p.add_argument(
        "--output",
        default=None,
        help=f"folder for topR/model.pt and curves (default {DEFAULT_OUTPUT_ROOT}/STUDY_NAME)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 when available, else cpu)")
    p.add_argument(
        "--artifact-dir",
        default=None,
        help="where each model.pt is stored as an Optuna artifact, for encoder_checkpoint: artifact:STUDY "
        "(default $HPO_ARTIFACT_DIR, else storage/artifacts)",
    )
    p.add_argument(
        "--allow-objective",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also run objectives from modules matching PATTERN (as hpo worker; see $HPO_ALLOW_OBJECTIVES)",
    )
    add_objective_path_argument(p)
    p.set_defaults(func=lazy_command("hpo.retrain", "cmd_retrain"))
