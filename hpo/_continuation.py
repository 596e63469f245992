"""A promoted configuration continues from its parent trial's checkpoint instead of retraining.

Multi-fidelity samplers (BOHB's brackets) run a promoted configuration again as a new Optuna trial
at a larger budget. hpbandster retrains it from epoch 0; with continuation the new trial starts
from the checkpoint its parent left at the previous rung's last epoch (model, optimizer and
scheduler state, and the metric history, which the trial re-records as its first epochs), as
ASHA-style methods do. Training uses the study's seed and the epoch number for its data order
(:func:`hpo.training.epoch_seed`), so the continued curve equals an uninterrupted run's.

The sampler says what to keep and what to continue through trial system attributes:

- ``hpo:continue_from``: on the promoted trial, its parent's trial number;
- ``hpo:keep_checkpoint``: True on a trial whose checkpoint a promotion may still need (the worker
  then keeps it when the trial finishes).

A kept checkpoint goes when its child has taken it over (the child removes it), or when the sampler
says no promotion will need it (``released_trials(study)``: its stage was decided without it). Optuna
refuses to change a finished trial's attributes, so neither is recorded on the kept trial itself:
the folder's absence is the record.

Every step can die at any line: the parent's checkpoint is hard-linked (copied where links are not
possible) into a temporary folder that is renamed into place, so the child's folder either holds a
whole checkpoint or none; a child that dies is retried from its own folder (``failed_trial``
shares it); and releasing is idempotent (removing a folder twice is harmless).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from hpo.studies import trial_checkpoint_dir

# hpo.training's file name (not imported: the BOHB sampler reads this module's names without torch).
CHECKPOINT_FILE = "checkpoint.pt"
CONTINUE_FROM_ATTR = "hpo:continue_from"
KEEP_CHECKPOINT_ATTR = "hpo:keep_checkpoint"


def keeps_checkpoint(system_attrs: Mapping[str, Any]) -> bool:
    """Whether a finished trial's checkpoint must stay for a promotion that may still come."""
    return system_attrs.get(KEEP_CHECKPOINT_ATTR) is True


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # checkpoints are replaced, never rewritten in place: a link is safe
    except OSError:
        shutil.copy2(source, target)


def take_over_parent_checkpoint(
    storage: BaseStorage, study_id: int, study_folder: Path, number: int, system_attrs: Mapping[str, Any]
) -> int | None:
    """Give trial ``number`` its parent's checkpoint when it continues one; the parent's number.

    Nothing happens when the trial is not a continuation, when its own folder already holds a
    checkpoint (a retry of the child resumes its own progress), or when the parent's checkpoint is
    gone (the trial then trains from scratch, which is what hpbandster does anyway).
    """
    parent_number = system_attrs.get(CONTINUE_FROM_ATTR)
    if not isinstance(parent_number, int) or isinstance(parent_number, bool):
        return None
    parent = _trial_by_number(storage, study_id, parent_number)
    if parent is None:
        return None
    parent_dir = trial_checkpoint_dir(study_folder, parent.number, parent.system_attrs)
    own = trial_checkpoint_dir(study_folder, number, system_attrs)
    source = parent_dir / CHECKPOINT_FILE
    taken = False
    if not (own / CHECKPOINT_FILE).is_file() and source.is_file():
        staging = own.parent / f".{own.name}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir(parents=True)
        try:
            _link_or_copy(source, staging / CHECKPOINT_FILE)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(own)  # an empty folder left by an attempt that died before its first epoch
            os.replace(staging, own)
            taken = True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if keeps_checkpoint(parent.system_attrs) and (own / CHECKPOINT_FILE).is_file():
        # The child owns the progress now (also when an earlier attempt of it took it over and
        # died before getting here); the parent's copy is no longer needed by anyone.
        shutil.rmtree(parent_dir, ignore_errors=True)
    return parent.number if taken else None


def _trial_by_number(storage: BaseStorage, study_id: int, number: int) -> FrozenTrial | None:
    return next((t for t in storage.get_all_trials(study_id, deepcopy=False) if t.number == number), None)


def release_checkpoints(study_folder: Path, trials: Iterable[FrozenTrial], released: Container[int]) -> int:
    """Remove the kept checkpoints of the trials numbered in ``released``; how many folders went.

    A retried trial shares its folder with the attempts before it (``failed_trial``), so a folder
    goes only when its latest attempt is finished and released.
    """
    latest: dict[Path, FrozenTrial] = {}
    for trial in trials:
        folder = trial_checkpoint_dir(study_folder, trial.number, trial.system_attrs)
        if folder not in latest or trial.number > latest[folder].number:
            latest[folder] = trial
    removed = 0
    for folder, trial in latest.items():
        if trial.number in released and trial.state.is_finished() and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
