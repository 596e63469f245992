"""A trial waiting for a slot takes over a re-queued trial's slot (see :func:`adopt_requeued`)."""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo import _optuna
from hpo.bohb._schedule import SlotRun, latest_runs
from hpo.bohb._trials import ADOPTED_BY_ATTR, SLOT_ATTR

# The fail-reason system attribute hpo's worker writes (the one `hpo status` shows).
_FAIL_REASON_ATTR = "fail_reason"


def adopt_requeued(
    study: optuna.Study, trial: FrozenTrial, trials: Sequence[FrozenTrial], runs: Sequence[SlotRun]
) -> bool:
    """Let the waiting ``trial`` run a re-queued trial's slot instead; whether it took one over.

    A trial waits only while an open bracket waits for a stage to finish. If a trial of that stage
    was re-queued (its worker died or was stopped) and every worker is waiting here, nobody would
    claim the retry: the stage, and so every waiting worker, would wait for ever. So the waiting
    trial claims the retry itself, takes over its slot, configuration and system attributes (a
    resumable checkpoint's link included), with a higher ``attempt`` so that it is the slot's
    current attempt; the retry is failed (``hpo:bohb:adopted_by``), and a new queued trial takes the
    waiting trial's place, so the study keeps its ``n_trials`` fresh trials.
    """
    storage = _optuna.study_storage(study)
    tid = _optuna.trial_id(trial)
    by_number = {t.number: t for t in trials}
    requeued = sorted(
        (by_number[run.number] for run in latest_runs(runs).values()),
        key=lambda t: t.number,
    )
    for retry in requeued:
        retry_id = _optuna.trial_id(retry)
        if retry.state != TrialState.WAITING or retry_id == tid:
            continue
        try:
            if not storage.set_trial_state_values(retry_id, TrialState.RUNNING):
                continue  # a worker claimed it meanwhile: it runs
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        attrs = storage.get_trial_system_attrs(retry_id)
        slot = dict(attrs[SLOT_ATTR])
        slot["attempt"] = int(slot.get("attempt", 0)) + 1
        reason = f"BOHB: its slot was taken over by trial {trial.number}, which was waiting for one"
        storage.set_trial_system_attr(retry_id, SLOT_ATTR, None)
        storage.set_trial_system_attr(retry_id, ADOPTED_BY_ATTR, trial.number)
        storage.set_trial_system_attr(retry_id, _FAIL_REASON_ATTR, reason)
        storage.set_trial_state_values(retry_id, TrialState.FAIL)
        for key, value in attrs.items():
            if key not in (SLOT_ATTR, ADOPTED_BY_ATTR, _FAIL_REASON_ATTR, "fixed_params"):
                storage.set_trial_system_attr(tid, key, value)
        storage.set_trial_system_attr(tid, SLOT_ATTR, slot)
        study.enqueue_trial({}, skip_if_exists=False)
        return True
    return False
