"""The worker loop: claim a queued trial, train it, record the result, repeat.

Guarantees (see also :mod:`hpo.studies`):

* a worker only runs trials queued when the study was created, so all workers together run
  exactly ``n_trials`` (a trial retried after its worker died replaces the failed one);
* a trial that raises is recorded FAIL with its reason and the worker goes on, until
  ``max_consecutive_failures`` trials in a row have failed;
* with heartbeats, a trial whose worker died is failed after the grace period and re-queued with
  the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``); a checkpoint-aware
  objective resumes it from the failed attempt's checkpoint;
* on SIGINT or SIGTERM the running trial is recorded FAIL, re-queued, and the worker exits with
  nothing of its own left RUNNING.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hpo.objective import BUDGET_ATTR, Objective, TrialRun, resolve_objective
from hpo.samplers import make_pruner, make_sampler
from hpo.space import suggest
from hpo.spec import StudySpec
from hpo.studies import checkpoint_folder, trial_checkpoint_dir

WORKER_ATTR = "hpo:worker"


class WorkerInterrupted(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT; a BaseException so objectives don't swallow it."""


@dataclass(frozen=True)
class WorkerOptions:
    n_trials: int | None = None  # this worker's own limit
    timeout: float | None = None  # seconds; no new trial starts after it
    device: str = "cpu"
    label: str = ""  # e.g. "gpu0.1", printed before each line
    max_consecutive_failures: int = 5
    poll_interval: float = 1.0
    checkpoint_root: Path = Path("storage/checkpoints")
    show_progress: bool = True


@dataclass
class WorkerSummary:
    finished: dict[str, int] = field(default_factory=lambda: {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0})
    stopped_because: str = ""

    @property
    def total(self) -> int:
        return sum(self.finished.values())


def worker_identity(label: str = "") -> str:
    ident = f"{socket.gethostname()}:{os.getpid()}"
    return f"{ident}:{label}" if label else ident


def active_workers(study: optuna.Study) -> set[str]:
    """Identities of the workers that hold a RUNNING trial of ``study`` (after failing stale ones)."""
    fail_stale_trials(study)
    running = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
    return {str(t.system_attrs.get(WORKER_ATTR, t.number)) for t in running}


def _waiting_trials(study: optuna.Study, limit: int = 16) -> list[tuple[int, int]]:
    """(id, number) of up to ``limit`` WAITING trials: retries first, then oldest first.

    On a relational storage this is one indexed query on Optuna's ``trials`` table instead of
    loading every waiting trial with its parameters and attributes (what ``Study.ask`` does).
    """
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # optuna.load_study wraps RDBStorage in a cache
    if isinstance(rdb, RDBStorage):
        with rdb.engine.connect() as conn:
            rows = conn.execute(
                # Retries of trials whose worker died come first: they resume from a checkpoint,
                # and multi-fidelity samplers (BOHB) wait on them to finish a rung.
                sqlalchemy.text(
                    "SELECT t.trial_id, t.number FROM trials t "
                    "LEFT JOIN trial_system_attributes a "
                    "ON a.trial_id = t.trial_id AND a.key = 'failed_trial' "
                    "WHERE t.study_id = :study AND t.state = 'WAITING' "
                    "ORDER BY (a.trial_id IS NULL), t.trial_id LIMIT :limit"
                ),
                {"study": study._study_id, "limit": limit},
            )
            return [(row[0], row[1]) for row in rows]
    trials = storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
    trials = sorted(trials, key=lambda t: ("failed_trial" not in t.system_attrs, t._trial_id))
    return [(t._trial_id, t.number) for t in trials[:limit]]


def claim_trial(study: optuna.Study) -> tuple[int, int] | None:
    """Atomically move one WAITING trial of ``study`` to RUNNING; its (id, number), or None if
    none is left.

    The storage changes the state only if the trial is still WAITING (a row lock on PostgreSQL,
    the database lock on SQLite), so two workers never claim the same trial.
    """
    storage = study._storage
    while True:
        candidates = _waiting_trials(study)
        if not candidates:
            return None
        for trial_id, number in candidates:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return trial_id, number
        # every candidate was taken by other workers meanwhile: look again


def _ensure_cached(study: optuna.Study, trial_id: int) -> None:
    """Make the claimed trial known to the study's trial cache.

    ``optuna.load_study`` wraps the RDB storage in a cache that parameter writes go through; a
    trial queued after the cache last read the study (a retry queued by another worker, say) is
    unknown there until the study's trials are read again. Reading them costs a query over every
    unfinished trial, so it is done only when the cache lacks the trial.
    """
    known = getattr(study._storage, "_trial_id_to_study_id_and_number", None)  # Optuna's cache index
    if not isinstance(known, dict) or trial_id not in known:
        study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))


def heartbeat_interval(storage: BaseStorage) -> int | None:
    """Seconds between heartbeats, or None when the storage has heartbeats off.

    ``optuna.load_study`` wraps an RDBStorage in a caching layer; both answer this method.
    """
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if callable(getter) else None


class Heartbeat:
    """Records a heartbeat for a running trial every ``interval`` seconds from a daemon thread."""

    def __init__(self, storage: BaseStorage, trial_id: int) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._stop = threading.Event()
        self._interval = heartbeat_interval(storage)
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self._interval is not None:
            self._storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]
            self._thread = threading.Thread(target=self._run, name="hpo-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self._interval is not None
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                self._storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Interrupts:
    """SIGTERM/SIGINT handling that never interrupts a database write.

    A signal only raises :class:`WorkerInterrupted` at once while the objective is computing
    (inside :meth:`interruptible`, outside :meth:`shielded`). Anywhere else it is remembered and
    acted on at the next safe point, so a storage transaction is never abandoned half-way (on
    SQLite that would keep the database locked for every other worker).
    """

    def __init__(self) -> None:
        self.pending: str | None = None
        self._raise_now = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.pending = self.pending or name
        if self._raise_now:
            self._raise_now = False
            raise WorkerInterrupted(name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals are delivered to the main thread only
            return
        previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def check(self) -> None:
        if self.pending:
            raise WorkerInterrupted(self.pending)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        was = self._raise_now
        self._raise_now = False
        try:
            yield
        finally:
            self._raise_now = was
        if was:
            self.check()


def _format_params(params: Mapping[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


class Worker:
    """Runs the trials of one study in this process."""

    def __init__(
        self,
        study: optuna.Study,
        spec: StudySpec,
        options: WorkerOptions,
        objective: Objective | None = None,
        console: Console | None = None,
    ) -> None:
        self.study = study
        self.spec = spec
        self.options = options
        self.objective = objective or resolve_objective(spec.objective, "stored definition")
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.identity = worker_identity(options.label)
        # Per-worker data cache: decoded datasets etc. survive from one trial to the next.
        self.cache: dict[str, Any] = {}
        self.interrupts = Interrupts()
        self._checkpoint_root = checkpoint_folder(options.checkpoint_root, study)
        study.pruner = make_pruner(spec.pruner, spec.budget.max_epochs)

    # ------------------------------------------------------------------ output
    def _say(self, message: str) -> None:
        prefix = f"[{self.options.label}] " if self.options.label else ""
        self.console.print(f"{prefix}{message}", markup=False)

    def _progress(self) -> Progress | None:
        if not (self.options.show_progress and self.console.is_terminal):
            return None
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )

    # ------------------------------------------------------------------ loop
    def run(self) -> WorkerSummary:
        summary = WorkerSummary()
        started = time.monotonic()
        consecutive_failures = 0
        storage = self.study._storage
        interval = heartbeat_interval(storage)
        heartbeat_enabled = interval is not None
        stale_checked = -math.inf
        with self.interrupts.installed():
            try:
                while True:
                    self.interrupts.check()
                    if self.options.n_trials is not None and summary.total >= self.options.n_trials:
                        summary.stopped_because = f"ran its {self.options.n_trials} trial(s)"
                        break
                    if (
                        self.options.timeout is not None
                        and time.monotonic() - started >= self.options.timeout
                    ):
                        summary.stopped_because = f"timeout of {self.options.timeout:g}s reached"
                        break
                    if interval is not None and time.monotonic() - stale_checked >= interval:
                        # Other workers' dead trials are failed (and re-queued) at most once per
                        # heartbeat interval: a trial cannot turn stale faster than that.
                        fail_stale_trials(self.study)
                        stale_checked = time.monotonic()
                    claimed = claim_trial(self.study)
                    if claimed is None:
                        stale_checked = -math.inf  # before concluding the study is done, look again
                        if self._study_done(heartbeat_enabled):
                            summary.stopped_because = "no trials left in the study"
                            break
                        with self.interrupts.interruptible():
                            time.sleep(self.options.poll_interval)  # others' trials may be retried
                        continue
                    state = self._run_trial(*claimed)
                    summary.finished[state.name] += 1
                    consecutive_failures = consecutive_failures + 1 if state == TrialState.FAIL else 0
                    if consecutive_failures >= self.options.max_consecutive_failures:
                        summary.stopped_because = (
                            f"{consecutive_failures} consecutive trials failed; stopping this worker "
                            "(see each trial's fail_reason with `hpo status`)"
                        )
                        break
            except WorkerInterrupted as interrupt:
                summary.stopped_because = f"interrupted by {interrupt}"
        self._say(f"worker {self.identity} stopped: {summary.stopped_because}")
        return summary

    def _study_done(self, heartbeat_enabled: bool) -> bool:
        trials = self.study._storage.get_all_trials(
            self.study._study_id, deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)
        )
        if not trials:
            return True
        # Only wait on other workers' RUNNING trials if a dead worker's trial can be detected
        # (heartbeats) and re-queued; otherwise there is nothing this worker could pick up.
        return not heartbeat_enabled and all(t.state == TrialState.RUNNING for t in trials)

    def _run_trial(self, trial_id: int, number: int) -> TrialState:
        storage = self.study._storage
        # A sampler per trial, seeded by the trial number: reproducible for one worker, and
        # parallel workers never draw the same random configuration from equal RNG states.
        self.study.sampler = make_sampler(self.spec, seed=self.spec.sampler_seed + number)
        _ensure_cached(self.study, trial_id)
        trial = optuna.Trial(self.study, trial_id)
        # Read after Trial(): the sampler's before_trial may have set this trial's budget.
        system_attrs = storage.get_trial_system_attrs(trial_id)
        storage.set_trial_system_attr(trial_id, WORKER_ATTR, self.identity)
        t0 = time.monotonic()
        run: TrialRun | None = None
        with Heartbeat(storage, trial_id):
            try:
                run = self._make_run(trial, suggest(trial, self.spec.space), number, system_attrs)
                value = self._train(run, number)
                if not math.isfinite(value):
                    raise FloatingPointError(f"objective returned {value}")
                run.flush()
                frozen = self.study.tell(trial, value)
            except optuna.TrialPruned as pruned:
                if run is not None:
                    run.flush()
                frozen = self.study.tell(trial, state=TrialState.PRUNED)
                self._finished(frozen, time.monotonic() - t0, str(pruned))
                return frozen.state
            except WorkerInterrupted as interrupt:
                with self.interrupts.shielded():
                    self._flush_quietly(run)
                    self._fail(trial_id, f"worker interrupted by {interrupt}")
                    frozen = storage.get_trial(trial_id)
                    RetryHeartbeatStaleTrialCallback()(self.study, frozen)  # re-queue, same params
                    self._finished(frozen, time.monotonic() - t0, "re-queued")
                raise
            except Exception as exc:  # a failing trial must never take the worker down
                reason = f"{type(exc).__name__}: {exc}"
                self._flush_quietly(run)
                self._fail(trial_id, reason, traceback.format_exc())
                frozen = storage.get_trial(trial_id)
                self._finished(frozen, time.monotonic() - t0, reason)
                return frozen.state
        self._finished(frozen, time.monotonic() - t0)
        return frozen.state

    def _make_run(
        self, trial: optuna.Trial, params: dict[str, Any], number: int, system_attrs: Mapping[str, Any]
    ) -> TrialRun:
        return TrialRun(
            trial=trial,
            spec=self.spec,
            params=params,
            max_epochs=int(system_attrs.get(BUDGET_ATTR, self.spec.budget.max_epochs)),
            device=self.options.device,
            checkpoint_dir=self._checkpoint_dir(number, system_attrs),
            cache=self.cache,
            shield=self.interrupts.shielded,
        )

    def _train(self, run: TrialRun, number: int) -> float:
        progress = self._progress()
        with contextlib.ExitStack() as stack:
            if progress is not None:
                stack.enter_context(progress)
                task = progress.add_task(f"trial {number}", total=run.max_epochs)
                run.on_epoch = lambda epoch, metrics: progress.update(task, completed=epoch)
            stack.enter_context(self.interrupts.interruptible())
            return float(self.objective.train(run))

    @staticmethod
    def _flush_quietly(run: TrialRun | None) -> None:
        # Keep the learning curve of a failing trial if the storage still takes writes.
        if run is not None:
            with contextlib.suppress(Exception):
                run.flush()

    def _checkpoint_dir(self, number: int, system_attrs: Mapping[str, Any]) -> Path:
        return trial_checkpoint_dir(self._checkpoint_root, number, system_attrs)

    def _fail(self, trial_id: int, reason: str, details: str | None = None) -> None:
        storage = self.study._storage
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_system_attr(trial_id, "fail_reason", reason)
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        if details and os.environ.get("HPO_DEBUG"):
            self._say(details)

    def _finished(self, trial: FrozenTrial, seconds: float, note: str = "") -> None:
        if note != "re-queued":
            # Finished for good: its checkpoint can no longer be resumed, so reclaim the disk.
            shutil.rmtree(self._checkpoint_dir(trial.number, trial.system_attrs), ignore_errors=True)
        value = f" value={trial.value:.6g}" if trial.value is not None else ""
        suffix = f" ({note})" if note else ""
        self._say(
            f"trial {trial.number} {trial.state.name}{value} [{_format_params(trial.params)}] "
            f"{seconds:.1f}s{suffix}"
        )
