"""Claiming a queued trial and keeping its lease (the supervisor's side of :mod:`hpo._rdb`).

A claim is one conditional update on a database (:meth:`hpo._rdb.HpoRDBStorage.claim_next`),
so two workers never hold one trial; the claim records the first heartbeat, and
:class:`Heartbeat` beats from its own thread while the trial trains. A trial whose beats stop
turns stale and is failed and re-queued in one transaction (:func:`fail_and_requeue`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpo import _optuna
from hpo._rdb import ATTEMPT_ATTRS, RETRY_HISTORY_ATTR, WORKER_ATTR, FailOutcome, rdb_of, with_retries


def worker_identity(label: str = "") -> str:
    ident = f"{socket.gethostname()}:{os.getpid()}"
    return f"{ident}:{label}" if label else ident


def claim_trial(
    study: optuna.Study,
    worker: str | None = None,
    accept: Callable[[dict[str, Any] | None], bool] | None = None,
) -> tuple[int, int] | None:
    """Atomically move one WAITING trial of ``study`` to RUNNING (recording ``worker`` as its
    holder); its (id, number), or None if none is left. Retries of dead attempts come first.

    ``accept``: only a trial it accepts, given the trial's fixed parameters (a grid point, an
    enqueued configuration; None for an empty slot), among the oldest queued ones
    (:meth:`hpo._rdb.HpoRDBStorage.claim_next`); through the gRPC proxy it is not consulted.
    """
    storage = _optuna.study_storage(study)
    rdb = rdb_of(storage)
    if rdb is not None:
        # Repeated after a lost answer, a claim may have won a trial nobody then runs: it never
        # beats, turns stale and is retried, so nothing is lost.
        limit = 16 if accept is None else 256  # skipped candidates stay queued: look further
        return with_retries(
            storage,
            lambda: rdb.claim_next(_optuna.study_id(study), limit=limit, worker=worker, accept=accept),
        )
    # The gRPC proxy: its server's storage makes the state change conditional.
    while True:
        waiting = storage.get_all_trials(
            _optuna.study_id(study), deepcopy=False, states=(TrialState.WAITING,)
        )
        if not waiting:
            return None
        waiting = sorted(waiting, key=lambda t: ("failed_trial" not in t.system_attrs, _optuna.trial_id(t)))
        for trial in waiting[:16]:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(_optuna.trial_id(trial), state=TrialState.RUNNING):
                    if worker is not None:
                        storage.set_trial_system_attr(_optuna.trial_id(trial), WORKER_ATTR, worker)
                    return _optuna.trial_id(trial), trial.number


def fail_and_requeue(
    study: optuna.Study, trial_id: int, reason: str, *, retry: bool, max_retry: int
) -> FailOutcome:
    """Record the trial FAIL with ``reason``, and (``retry``) queue a clean retry of it.

    On a database (SQLite, PostgreSQL) both happen in one transaction. Through the gRPC proxy
    they are two calls: a worker killed between them leaves the trial failed without its retry.
    """
    storage = _optuna.study_storage(study)
    rdb = rdb_of(storage)
    if rdb is not None:
        return with_retries(storage, lambda: rdb.fail_and_requeue(trial_id, reason, retry=retry))
    frozen = storage.get_trial(trial_id)
    history = [*frozen.system_attrs.get(RETRY_HISTORY_ATTR, []), frozen.number]
    if retry and len(history) > max_retry:
        reason = f"{reason}; not retried: all {max_retry} retries of this configuration used"
        retry = False
    storage.set_trial_system_attr(trial_id, "fail_reason", reason)
    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    try:
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return FailOutcome(False)
    if not retry:
        return FailOutcome(True, None, reason)
    queue_retry(study, frozen, history)
    return FailOutcome(True, -1, reason)


def queue_retry(study: optuna.Study, frozen: FrozenTrial, history: list[int]) -> None:
    """Queue a clean retry of the failed trial ``frozen`` (its parameters; none of its attempt's
    records), ``history`` its chain of attempts: through the gRPC proxy, what
    :meth:`hpo._rdb.HpoRDBStorage.fail_and_requeue` does in its transaction."""
    system = {k: v for k, v in frozen.system_attrs.items() if k not in ATTEMPT_ATTRS}
    system.update({"failed_trial": system.get("failed_trial", frozen.number), RETRY_HISTORY_ATTR: history})
    system["hpo:retry_of"] = frozen.number
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=frozen.params,
            distributions=frozen.distributions,
            system_attrs=system,
        )
    )


def heartbeat_interval(storage: BaseStorage) -> int | None:
    """Seconds between heartbeats, or None when the storage has heartbeats off."""
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if callable(getter) else None


def inner_storage(storage: BaseStorage) -> BaseStorage:
    """The storage under hpo's retrying layer: calls that must not block on an outage use it."""
    inner = getattr(storage, "inner", None)
    return inner if isinstance(inner, BaseStorage) else storage


class Heartbeat:
    """Records a heartbeat for a running trial every ``interval`` seconds from a daemon thread.

    Missed beats (the database is down) are not retried: the next interval beats again.
    """

    def __init__(self, storage: BaseStorage, trial_id: int) -> None:
        self._storage = inner_storage(storage)
        self._trial_id = trial_id
        self._stop = threading.Event()
        self._interval = heartbeat_interval(storage)
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self._interval is not None:
            self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self._interval is not None
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):
                self._storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
