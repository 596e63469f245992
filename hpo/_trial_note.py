"""A failed trial's traceback as its note in optuna-dashboard (the "Note" card of the trial's page).

optuna-dashboard prints neither system attributes nor long user attributes, so the traceback the
worker stores (``hpo:traceback``, see :mod:`hpo.worker`) is also written as the trial's note, in
the format optuna-dashboard's ``save_note(trial, body)`` writes: study system attributes
``dashboard:<trial_id>:note_ver`` and ``dashboard:<trial_id>:note_str:<i>`` (chunks of 2045
characters). As in :mod:`hpo._dashboard_data`, hpo writes that format itself rather than importing
optuna_dashboard (about 2 s) in a worker; ``tests/test_cli_usability.py`` reads the note back
through the dashboard's own HTTP API, so a release that changes the format fails there.
"""

from __future__ import annotations

from typing import Any

from optuna.storages import BaseStorage

from hpo._dashboard_data import CHUNK_CHARS


def failure_note(reason: str, traceback: str) -> str:
    """The note's Markdown: the reason, then the traceback as a fenced block."""
    fence = "~~~~" if "```" in traceback else "```"
    return f"**Failed**: {reason}\n\n{fence}text\n{traceback.rstrip()}\n{fence}\n"


def trial_note_attrs(trial_id: int, body: str, version: int = 1) -> dict[str, Any]:
    """The study system attributes that make ``body`` the note of the trial with id ``trial_id``."""
    prefix = f"dashboard:{trial_id}:note_str:"
    chunks = {
        f"{prefix}{i}": body[start : start + CHUNK_CHARS]
        for i, start in enumerate(range(0, len(body), CHUNK_CHARS))
    }
    return {f"dashboard:{trial_id}:note_ver": version, **chunks}


def save_failure_note(
    storage: BaseStorage, study_id: int, trial_id: int, reason: str, traceback: str
) -> None:
    """Write a failed trial's reason and traceback as its dashboard note (a new trial has no note yet,
    so nothing is overwritten; a retry is a new trial with its own note)."""
    for key, value in trial_note_attrs(trial_id, failure_note(reason, traceback)).items():
        storage.set_study_system_attr(study_id, key, value)
