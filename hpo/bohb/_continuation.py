"""Which checkpoints a bracket still needs: BOHB's side of :mod:`hpo._continuation`.

With continuation, a configuration promoted from stage ``s`` to ``s + 1`` continues the checkpoint of
the trial that ran it at stage ``s`` (its parent) instead of retraining from epoch 0. The sampler
writes, with each slot it hands out, what the worker needs to know (trial system attributes):

- every trial below the plan's largest budget keeps its checkpoint when it finishes
  (``hpo:keep_checkpoint`` True), since the next stage may promote it;
- a promoted trial names its parent (``hpo:continue_from``);
- once a stage's promotions are decided, the trials of the stage before it that were not promoted
  are released (``BOHBSampler.released_trials``; the worker then removes their folders).

Pure functions over the slots rebuilt from the storage, so a process that dies between two steps
leaves nothing another call does not repair: what is released is recomputed from the recorded
decisions every time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optuna.trial import FrozenTrial

from hpo._continuation import CONTINUE_FROM_ATTR, KEEP_CHECKPOINT_ATTR
from hpo.bohb._schedule import Assignment, ConfigId, RungKey, SlotRun, latest_runs


def continuation_attrs(assignment: Assignment, runs: Sequence[SlotRun], max_budget: float) -> dict[str, Any]:
    """The system attributes of a trial given ``assignment`` (before its slot attribute is written)."""
    attrs: dict[str, Any] = {}
    if assignment.budget < max_budget:
        attrs[KEEP_CHECKPOINT_ATTR] = True
    if assignment.promoted:
        parents = [
            run
            for run in latest_runs(runs).values()
            if run.finished
            and (run.bracket, run.stage) == (assignment.bracket, assignment.stage - 1)
            and run.config == assignment.config
        ]
        if parents:
            attrs[CONTINUE_FROM_ATTR] = parents[0].number
    return attrs


def unpromoted_kept(
    trials: Sequence[FrozenTrial], runs: Sequence[SlotRun], decisions: Mapping[RungKey, Sequence[ConfigId]]
) -> list[FrozenTrial]:
    """Finished trials still keeping a checkpoint that no decided promotion took."""
    by_number = {t.number: t for t in trials}
    kept = []
    for run in latest_runs(runs).values():
        promoted = decisions.get((run.bracket, run.stage + 1))
        if promoted is None or not run.finished or run.config in promoted:
            continue
        trial = by_number.get(run.number)
        if trial is not None and trial.system_attrs.get(KEEP_CHECKPOINT_ATTR) is True:
            kept.append(trial)
    return kept
