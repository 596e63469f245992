"""A worker whose first trials all fail the same way stops before it spends the study's budget.

A bug in the objective (a ``ZeroDivisionError``, a metric name it never reports, a missing file)
fails every trial the same way. Without this rule a worker would record ``--max-consecutive-
failures`` trials FAIL and each would use up one of the study's ``n_trials`` slots. With it:

* the first :data:`BROKEN_AFTER` trials of a worker failing with the *same error* (the same
  exception type, message and innermost traceback line) make the objective look broken;
* those trials are re-queued: each is recorded FAIL (its traceback stays with it) and a clean
  retry of its configuration is queued, in one transaction (:meth:`hpo._rdb.HpoRDBStorage.
  fail_and_requeue`), so once the code is fixed ``hpo worker`` runs exactly ``n_trials`` trials;
* the worker stops with exit status 1 and one line saying so, with the fix.

Only exceptions raised by the training code count (not a trainer killed by the OOM killer, a
timeout or a sampler error), and only on a worker's first trials: one that completes or is pruned,
or two different errors, show the objective works, and from then on a failing configuration (a
"poison" trial) fails for good as before and the worker goes on. Re-queues count against
``--max-retry`` like any retry, so a configuration that is really the culprit ends FAIL for good
after that many re-runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import optuna
from optuna.trial import TrialState

from hpo import _optuna
from hpo._lease import queue_retry
from hpo._rdb import RETRY_HISTORY_ATTR, FailOutcome, rdb_of
from hpo.errors import INPUT_ERROR_TYPES

# This many first trials of a worker failing with the same error make the objective look broken.
BROKEN_AFTER = 2
# Appended to the fail reason of the trials re-queued because of that.
BROKEN_NOTE = "the objective looks broken"
# The same, when what they failed on is the study's input (a study file, a dataset path).
INPUT_NOTE = "the study's input is wrong"

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]*)", line (?P<line>\d+), in (?P<name>.*)$')
_T = TypeVar("_T")


@dataclass(frozen=True)
class TrialError:
    """An exception raised by the training code of one trial, as the trainer reported it."""

    exc_type: str
    message: str
    traceback: str = ""

    @property
    def where(self) -> str:
        """The innermost frame of the traceback (``file:line in function``), or ``""``."""
        last = ""
        for line in self.traceback.splitlines():
            match = _FRAME.match(line)
            if match:
                last = f"{match['file']}:{match['line']} in {match['name']}"
        return last

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.exc_type, self.message, self.where)


@dataclass
class FirstFailures:
    """Watches the first trials of one worker (see the module docstring). Not thread-safe: the
    worker's own loop calls it."""

    limit: int = BROKEN_AFTER
    _failed: list[tuple[int, int, TrialError]] = field(default_factory=list)  # (id, number, error)
    _armed: bool = True
    _broken_at: int | None = None  # the trial id whose failure made the objective look broken
    # _failed[:_settled] have been (or are being) re-queued. A fused group's members fail in one
    # batch: each failure after the broken streak began is re-queued as it is recorded, and
    # requeue_earlier must not queue a second retry of any.
    _settled: int = 0
    _deferred: set[int] = field(default_factory=set)  # see deferred()

    requeued: bool = True  # every earlier trial got its retry (see requeue_earlier)

    def failed(self, trial_id: int, number: int, error: TrialError) -> bool:
        """Trial ``trial_id`` failed with ``error`` (not recorded yet). False: record it as usual.
        True: the objective looks broken; call :meth:`requeue_earlier`, fail and re-queue this
        trial too, and stop the worker once it has ended (:meth:`ended`). Further alike failures
        told before the worker stops (the other members of a fused group) are True as well: each
        is re-queued once, and the worker stops after the last of them."""
        if not self._armed:
            return False
        if self._failed and self._failed[0][2].key != error.key:
            self._armed = False  # two different errors: the trials fail, not the objective
            return False
        self._failed.append((trial_id, number, error))
        if len(self._failed) < self.limit:
            return False
        self._broken_at = trial_id
        return True

    def requeue_earlier(self, study: optuna.Study, reason: str, max_retry: int) -> None:
        """Re-queue the earlier trials of the broken streak (already recorded FAIL), first: a
        worker killed before it re-queues the current trial leaves that one RUNNING, and stale
        trials are failed and re-queued by the next worker."""
        earlier, self._settled = self._failed[self._settled : -1], len(self._failed)
        for trial_id, _, _ in earlier:
            outcome = requeue_failed(study, trial_id, reason, max_retry)
            self.requeued = self.requeued and outcome.retry_trial_id is not None

    def deferred(self, trial_id: int) -> None:
        """Trial ``trial_id`` failed in a way that says nothing yet about the objective: an
        exception raised for its whole fused group, its retry run alone to tell. Its ending
        neither counts toward the rule nor disarms it."""
        self._deferred.add(trial_id)

    def ended(self, trial_id: int) -> bool:
        """Trial ``trial_id`` ended (however). True when the worker must stop: its failure made the
        objective look broken. Any ending other than a failure passed to :meth:`failed` (a
        success, a pruned trial, a dead trainer, a timeout) disarms the rule for good, except
        one :meth:`deferred`."""
        if self._broken_at is not None and self._broken_at == trial_id:
            return True
        if trial_id in self._deferred:
            return False
        if not any(trial_id == failed_id for failed_id, _, _ in self._failed):
            self._armed = False
        return False

    def stop_message(self, requeued: bool = True) -> str:
        """Why the worker stops, in one line with the fix."""
        numbers = ", ".join(str(number) for _, number, _ in self._failed)
        error = self._failed[0][2]
        where = f" at {error.where}" if error.where else ""
        counted = (
            "they were re-queued and do not count toward n_trials"
            if requeued
            else "they were not re-queued (their configurations used all of --max-retry)"
        )
        if error.exc_type in INPUT_ERROR_TYPES:  # its message names the file, the field and the fix
            return (
                f"{INPUT_NOTE}: {_first_line(error.message)}; the first "
                f"{len(self._failed)} trials of this worker ({numbers}) failed on it and {counted}"
            )
        return (
            f"the objective looks broken: the first {len(self._failed)} trials of this worker "
            f"({numbers}) failed with the same error, {error.exc_type}: {_first_line(error.message)}"
            f"{where} (traceback above); {counted} (fix: correct the objective, then run hpo worker "
            "again; it runs the re-queued trials first)"
        )


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _retrying(storage: object, fn: Callable[[], _T]) -> _T:
    """``fn()`` with the storage's retries when it has them (as :mod:`hpo.worker` does)."""
    call = getattr(storage, "call", None)
    return call(fn) if callable(call) and hasattr(storage, "inner") else fn()


def requeue_failed(study: optuna.Study, trial_id: int, reason: str, max_retry: int) -> FailOutcome:
    """Queue a clean retry of the FAIL trial ``trial_id`` and record ``reason`` with it.

    On a database this is :meth:`~hpo._rdb.HpoRDBStorage.fail_and_requeue` on a FAIL trial (one
    transaction; the retry counts against ``max_retry``). Through the gRPC proxy it is two calls,
    as :func:`hpo._lease.fail_and_requeue` does.
    """
    storage = _optuna.study_storage(study)
    rdb = rdb_of(storage)
    if rdb is not None:
        return _retrying(
            storage, lambda: rdb.fail_and_requeue(trial_id, reason, retry=True, expected=(TrialState.FAIL,))
        )
    frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.FAIL:
        return FailOutcome(False)
    history = [*frozen.system_attrs.get(RETRY_HISTORY_ATTR, []), frozen.number]
    if len(history) > max_retry:
        reason = f"{reason}; not retried: all {max_retry} retries of this configuration used"
        storage.set_trial_system_attr(trial_id, "fail_reason", reason)
        return FailOutcome(True, None, reason)
    storage.set_trial_system_attr(trial_id, "fail_reason", reason)
    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    queue_retry(study, frozen, history)
    return FailOutcome(True, -1, reason)
