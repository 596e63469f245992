"""Ray's ``OptunaSearch`` on the hpo study: the study's sampler, its storage, its queued trials.

:class:`StudySearch` is Ray Tune's ``OptunaSearch`` pointed at the existing study (same storage,
same study name, the study's own sampler), with the changes hpo's guarantees need:

* trials: instead of ``study.ask()``, which creates a new trial when none is queued, it claims a
  queued WAITING trial exactly like a plain worker (:func:`hpo._lease.claim_trial`), so Ray and
  plain workers together run exactly ``n_trials``; the claimed trial then goes through
  ``OptunaSearch``'s define-by-run path (our :func:`hpo.space.suggest`, conditional spaces and
  fixed grid points included), sampled by the study's sampler seeded from the study seed and
  the trial number (:func:`hpo.samplers.trial_seed`), as plain workers do;
* intermediate values: recorded by the trainable at the objective's epoch numbers (Ray's
  ``training_iteration`` differs from the epoch after a restore), so ``on_trial_result`` adds
  nothing;
* outcomes: COMPLETE from the trainable's final result (the objective's return value, not the
  last epoch's metric); PRUNED when Ray's scheduler stopped the trial; FAIL with a reason when
  Ray gave up restoring it; a trial Ray never started goes back to WAITING;
* liveness: the driver keeps heartbeats for every trial it holds, so if it dies its trials are
  failed and re-queued by the next worker, as for plain workers;
* no pickled searcher state: the Optuna storage is the state (``save``/``restore`` do nothing).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from hpo import _optuna
from hpo._lease import claim_trial, fail_and_requeue, worker_identity
from hpo._rdb import WORKER_ATTR, fail_stale, set_trial_params
from hpo.ray_backend._schedulers import EPOCH_KEY
from hpo.ray_backend._trainable import (
    FINAL_KEY,
    TRIAL_ID_KEY,
    VALUE_KEY,
    checkpoint_dir_of,
    record_failure,
)
from hpo.samplers import make_sampler, trial_seed
from hpo.space import SearchSpace, suggest
from hpo.spec import StudySpec
from hpo.storage import HeartbeatSettings


class _DefineByRun:
    """OptunaSearch's define-by-run space: hpo's sampling, plus the trial id for the trainable."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        # ``trial`` is OptunaSearch's wrapper around the claimed optuna.Trial; the configuration
        # is written in one transaction, as hpo's workers write it.
        claimed = _optuna.define_by_run_trial(trial)
        with _optuna.deferred_param_writes(claimed) as sampled:
            params = suggest(trial, self.space)
        set_trial_params(_optuna.study_storage(claimed.study), _optuna.trial_id(claimed), sampled)
        return {**params, TRIAL_ID_KEY: _optuna.trial_id(claimed)}


class _Heartbeats:
    """One daemon thread beating for every trial the driver holds (plain workers beat per trial)."""

    def __init__(self, storage: BaseStorage) -> None:
        self._storage = storage
        self.interval = _optuna.heartbeat_interval(storage)
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        if self.interval is None:
            return
        _optuna.record_heartbeat(self._storage, trial_id)
        with self._lock:
            self._ids.add(trial_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hpo-ray-heartbeat", daemon=True)
            self._thread.start()

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _run(self) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self._ids)
            for trial_id in ids:
                with contextlib.suppress(Exception):  # a missed beat is retried next interval
                    _optuna.record_heartbeat(self._storage, trial_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass(frozen=True)
class SearchLimits:
    """When the driver stops handing out trials (running trials always finish)."""

    n_trials: int | None = None  # this run's own limit (--n-trials)
    timeout: float | None = None  # seconds after start (--timeout)
    max_consecutive_failures: int = 5
    max_failures: int = 3  # Ray's restores of a trial whose process or node died (--max-retry)
    poll_interval: float = 1.0  # seconds between storage polls while nothing is claimable


@dataclass
class SearchReport:
    finished: dict[str, int] = field(default_factory=lambda: {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0})
    stopped_because: str = ""
    failures_in_a_row: int = 0
    too_many_failures: bool = False

    @property
    def total(self) -> int:
        return sum(self.finished.values())


class _NoSlotYet(Exception):
    """The sampler would have to wait for this trial's slot (BOHB); the trial goes back."""


def _no_waiting() -> None:
    raise _NoSlotYet


class StudySearch(OptunaSearch):
    """``OptunaSearch`` over an existing hpo study (see the module docstring)."""

    def __init__(
        self,
        study: optuna.Study,
        spec: StudySpec,
        limits: SearchLimits,
        checkpoint_root: Path,
        say: Callable[[str], None],
    ) -> None:
        super().__init__(
            space=_DefineByRun(spec.space),
            metric=spec.metric,
            mode="min" if spec.direction == "minimize" else "max",
            sampler=make_sampler(spec),  # re-seeded per trial in suggest()
            study_name=study.study_name,
            storage=_optuna.study_storage(study),
        )
        # OptunaSearch loaded the study (its own Study object on the same storage).
        self._study = _optuna.ray_search_study(self)
        self._spec = spec
        self._limits = limits
        self._checkpoint_root = checkpoint_root
        self._say = say
        self._heartbeats = _Heartbeats(_optuna.study_storage(study))
        self._identity = worker_identity("ray-driver")
        self._started = time.monotonic()
        self._last_empty_poll = -float("inf")
        self._claimed = 0
        self.report = SearchReport()

    # ------------------------------------------------------------------ Ray's Searcher API
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """A claimed queued trial's parameters; None to be asked again later; FINISHED when done."""
        if self.report.stopped_because:
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray's own sentinel
        reason = self._limit_reached()
        if reason:
            self.report.stopped_because = reason
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray's own sentinel
        now = time.monotonic()
        if now - self._last_empty_poll < self._limits.poll_interval:
            return None  # nothing was claimable a moment ago; don't hammer the database
        study = self._study
        if self._heartbeats.interval is not None:
            # fails and re-queues trials of dead workers, as plain workers do
            fail_stale(_optuna.study_storage(study), _optuna.study_id(study))
        claimed = claim_trial(study)
        if claimed is None:
            self._last_empty_poll = now
            if self._study_done():
                self.report.stopped_because = "no trials left in the study"
                return Searcher.FINISHED  # type: ignore[return-value]  # Ray's own sentinel
            return None  # others' running trials may still be re-queued
        self._claimed += 1
        optuna_id, number = claimed
        self._heartbeats.add(optuna_id)
        _optuna.study_storage(study).set_trial_system_attr(optuna_id, WORKER_ATTR, self._identity)
        # A sampler per trial seeded by the trial number, exactly as plain workers do: a later
        # run (or another worker) never replays the same random draws, and a run is reproducible.
        study.sampler = make_sampler(self._spec, seed=trial_seed(self._spec.sampler_seed, number))
        if hasattr(study.sampler, "wait_check"):
            # BOHB may have to wait for a rung to finish before this trial has a slot; Ray's event
            # loop must not block on it (the results that end the wait arrive through it).
            study.sampler.wait_check = _no_waiting
        # The sampler's before_trial hook runs here, in the driver, as with a plain worker.
        try:
            _optuna.ray_search_trials(self)[trial_id] = _optuna.trial_for(study, optuna_id)
        except _NoSlotYet:
            self._heartbeats.discard(optuna_id)
            self._release(_optuna.study_storage(study).get_trial(optuna_id))
            self._claimed -= 1
            self._last_empty_poll = now
            return None  # asked again in a moment
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Nothing to do: the trainable records each epoch at its own epoch number."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        ot_trial = _optuna.ray_search_trials(self).get(trial_id)
        completed = _optuna.ray_search_completed(self)
        if ot_trial is None or trial_id in completed:
            return
        storage = _optuna.study_storage(self._study)
        optuna_id = _optuna.trial_id(ot_trial)
        self._heartbeats.discard(optuna_id)
        frozen = storage.get_trial(optuna_id)
        note = ""
        if frozen.state.is_finished():
            completed.add(trial_id)  # the trainable recorded FAIL or PRUNED itself
        elif error:
            note = f"its process or node died {self._limits.max_failures + 1} time(s); Ray gave up"
            record_failure(storage, optuna_id, f"RayTrialError: {note}; see the Ray logs of trial {trial_id}")
            completed.add(trial_id)
        elif result is not None and result.get(FINAL_KEY):
            # OptunaSearch tells COMPLETE with result[metric]: give it the objective's value.
            super().on_trial_complete(trial_id, result={**result, self._spec.metric: result[VALUE_KEY]})
        elif result is None or self._spec.metric not in result:
            self._release(frozen)  # Ray never ran it: back to the queue, same parameters
            completed.add(trial_id)
            self._say(f"trial {frozen.number} returned to the queue (not started by Ray)")
            return
        else:
            note = f"stopped by the Ray scheduler at epoch {result.get(EPOCH_KEY)}"
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self._study.tell(ot_trial, state=TrialState.PRUNED)
            completed.add(trial_id)
        self._finished(storage.get_trial(optuna_id), note)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: every trial and its state is in the Optuna storage."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: a new run continues from the Optuna storage."""

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles its Tuner (search algorithm included) for its own experiment restore,
        # which hpo does not use; threads, locks and callbacks stay out of that copy.
        state = self.__dict__.copy()
        for key in ("_heartbeats", "_say"):
            state.pop(key, None)
        return state

    # ------------------------------------------------------------------ hpo's bookkeeping
    def _limit_reached(self) -> str:
        limits = self._limits
        if limits.n_trials is not None and self._claimed >= limits.n_trials:
            return f"ran its {limits.n_trials} trial(s)"
        if limits.timeout is not None and time.monotonic() - self._started >= limits.timeout:
            return f"timeout of {limits.timeout:g}s reached"
        if self.report.failures_in_a_row >= limits.max_consecutive_failures:
            self.report.too_many_failures = True
            return (
                f"{self.report.failures_in_a_row} consecutive trials failed; stopping "
                "(see each trial's fail_reason with `hpo status`)"
            )
        return ""

    def _study_done(self) -> bool:
        trials = self._study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
        mine = {_optuna.trial_id(t) for t in _optuna.ray_search_trials(self).values()}
        others = [t for t in trials if _optuna.trial_id(t) not in mine]
        if not others:
            return True
        # Wait on other workers' RUNNING trials only if a dead worker's trial is detected
        # (heartbeats) and re-queued; otherwise there is nothing more to claim.
        return self._heartbeats.interval is None and all(t.state == TrialState.RUNNING for t in others)

    def _release(self, frozen: FrozenTrial) -> None:
        """Give an unstarted trial back to the queue; its parameters stay with it."""
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            _optuna.study_storage(self._study).set_trial_state_values(
                _optuna.trial_id(frozen), state=TrialState.WAITING
            )

    def release_unfinished(self) -> int:
        """After the run: re-queue every trial this driver still holds (interrupted run).

        A trial that trained is recorded FAIL and re-queued with the same parameters, exactly
        as a plain worker does when interrupted (its checkpoint is kept for the retry); a trial
        that never trained simply goes back to WAITING. Returns how many were handed back.
        """
        storage = _optuna.study_storage(self._study)
        count = 0
        for ot_trial in _optuna.ray_search_trials(self).values():
            frozen = storage.get_trial(_optuna.trial_id(ot_trial))
            self._heartbeats.discard(_optuna.trial_id(frozen))
            if frozen.state != TrialState.RUNNING:
                continue
            count += 1
            if frozen.intermediate_values:
                fail_and_requeue(
                    self._study,
                    _optuna.trial_id(frozen),
                    "worker interrupted (Ray run ended early)",
                    retry=True,
                    max_retry=HeartbeatSettings.max_retry,
                )
            else:
                self._release(frozen)
        self._heartbeats.stop()
        return count

    def _finished(self, trial: FrozenTrial, note: str) -> None:
        state = trial.state.name
        if state in self.report.finished:
            self.report.finished[state] += 1
        self.report.failures_in_a_row = self.report.failures_in_a_row + 1 if state == "FAIL" else 0
        if state == "FAIL" and not note:
            note = str(trial.system_attrs.get("fail_reason", ""))
        if trial.state.is_finished():
            # Finished for good: its checkpoint can no longer be resumed (this machine's copy).
            shutil.rmtree(checkpoint_dir_of(self._checkpoint_root, self._study, trial), ignore_errors=True)
        value = f" value={trial.value:.6g}" if trial.value is not None and state == "COMPLETE" else ""
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
        )
        seconds = ""
        if trial.datetime_start and trial.datetime_complete:
            seconds = f" {(trial.datetime_complete - trial.datetime_start).total_seconds():.1f}s"
        self._say(f"trial {trial.number} {state}{value} [{params}]{seconds}{f' ({note})' if note else ''}")
