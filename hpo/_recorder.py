"""A trial's intermediate records (values, attributes, pruning questions), written without ever
blocking its training on a database outage."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna

from hpo import _optuna
from hpo._interrupts import Interrupts
from hpo.resilient import StorageUnavailable, is_transient


class Recorder:
    """Writes one trial's intermediate records, never blocking the training on an outage.

    Each write is tried once on the storage under the retrying layer; a write that fails because
    the database is unreachable is kept, in order, and tried again later, and while any is
    pending no pruning decision is taken (the trial trains on). A write refused because the trial
    is already finished means the lease was lost (another worker failed the trial as stale and
    queued its retry): the trial is given up.
    """

    RETRY_EVERY_S = 2.0

    def __init__(
        self,
        study: optuna.Study,
        trial_id: int,
        say: Callable[[str], None],
    ) -> None:
        """``study`` is bound to the storage under the retrying layer (see ``Worker``)."""
        self._storage = _optuna.study_storage(study)
        self._study = study
        self._trial_id = trial_id
        self.say = say
        self._pending: list[Callable[[], None]] = []
        self._reported: set[int] = set()
        self._down_since: float | None = None
        self._last_try = 0.0
        self.lost = False

    def report(self, value: float, step: int) -> None:
        if step in self._reported:
            return  # a resumed trial re-reports restored epochs; Optuna keeps the first
        self._reported.add(step)
        self._do(lambda: self._storage.set_trial_intermediate_value(self._trial_id, step, value))

    def user_attr(self, key: str, value: Any) -> None:
        self._do(lambda: self._storage.set_trial_user_attr(self._trial_id, key, value))

    def system_attr(self, key: str, value: Any) -> None:
        self._do(lambda: self._storage.set_trial_system_attr(self._trial_id, key, value))

    def should_prune(self) -> bool:
        if self._pending or self.lost:
            return False
        try:
            frozen = self._storage.get_trial(self._trial_id)
            return bool(self._study.pruner.prune(self._study, frozen))
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._went_down(exc)
            return False

    def _do(self, write: Callable[[], None]) -> None:
        if not self.lost:
            self._pending.append(write)
            self.drain()

    def drain(self) -> bool:
        """Try the pending writes; True when none is left."""
        self._last_try = time.monotonic()
        while self._pending and not self.lost:
            try:
                self._pending[0]()
            except optuna.exceptions.UpdateFinishedTrialError:
                self.lost = True
                self._pending.clear()
                return True
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._went_down(exc)
                return False
            self._pending.pop(0)
        if self._down_since is not None:
            self.say(f"database reachable again after {time.monotonic() - self._down_since:.1f}s")
            self._down_since = None
        return True

    def retry_due(self) -> None:
        if self._pending and time.monotonic() - self._last_try >= self.RETRY_EVERY_S:
            self.drain()

    def drain_blocking(self, patience: float, interrupts: Interrupts) -> None:
        """Write everything pending, waiting for the database up to ``patience`` seconds."""
        deadline = time.monotonic() + patience
        while not self.drain():
            if time.monotonic() > deadline:
                raise StorageUnavailable(
                    f"the database stayed unreachable for {patience:g}s while trial records were "
                    "pending (fix: check the database server; raise --storage-patience)"
                )
            interrupts.wake.wait(self.RETRY_EVERY_S)

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.say(f"database unreachable, training on and keeping this trial's records: {first[:200]}")
