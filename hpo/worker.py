"""The worker: a supervisor that claims queued trials, keeps their lease and records them, and a
trainer process (:mod:`hpo.trainer`) that trains them.

Guarantees (see also :mod:`hpo.studies` and :mod:`hpo._rdb`):

* workers only run trials queued when the study was created, and a claim is one conditional
  update, so all workers together run exactly ``n_trials`` trials (a retry replaces the attempt
  it retries);
* the claim records the first heartbeat; from then on the supervisor beats from its own thread
  while the trainer trains, so a training step that holds the GIL never looks dead, and a worker
  killed at any line leaves a trial that turns stale and is failed and re-queued (one transaction)
  by any other worker;
* whatever the training code does to its process (an exception, ``SystemExit``, ``os._exit``, a
  segfault, the OOM killer) ends the trial, FAIL with the cause, never the worker; a trial that
  killed its trainer is retried, at most ``max_retry`` times over its whole chain of retries;
  a trial running longer than ``budget.trial_timeout`` is stopped and failed;
* storage errors are waited out: the trial in hand keeps training, its records are written once
  the database answers again, and a trial whose lease expired meanwhile is not written twice;
* on SIGINT or SIGTERM the trainer is stopped, the running trial is recorded FAIL and re-queued
  (counted against ``max_retry``), and the worker exits 130 or 143.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from hpo import _optuna
from hpo._continuation import (
    keeps_checkpoint,
    release_checkpoints,
    take_over_parent_checkpoint,
)
from hpo._dashboard_data import CurvePublisher
from hpo._first_failures import BROKEN_NOTE, FirstFailures, TrialError
from hpo._progress import EpochBar, StudyCounts, better, finish_note, read_counts
from hpo._rdb import (
    ATTEMPT_ATTRS,
    RETRY_ALONE_ATTR,
    RETRY_HISTORY_ATTR,
    WORKER_ATTR,
    FailOutcome,
    fail_stale,
    rdb_of,
    set_trial_params,
    with_retries,
)
from hpo._trial_note import save_failure_note
from hpo.errors import HpoError
from hpo.objective import BUDGET_ATTR, Objective
from hpo.resilient import StorageUnavailable, is_transient
from hpo.samplers import make_pruner, make_sampler, trial_seed
from hpo.shared_data import sweep_unused
from hpo.space import suggest
from hpo.spec import StudySpec
from hpo.studies import checkpoint_folder, trial_checkpoint_dir
from hpo.trainer import GROUP_FAILURE, THREADS_ENV, TrialJob, describe_exit, inline_main, trainer_main

if TYPE_CHECKING:
    from hpo._fused_worker import FusedGroups

T = TypeVar("T")
TRACEBACK_ATTR = "hpo:traceback"
# A traceback is stored with its failed trial up to this many characters (its last ones).
TRACEBACK_LIMIT = 8000
# How long a new trainer may take to import the objective (torch, torchvision) and say ready.
TRAINER_START_TIMEOUT_S = 300.0
# How long a trainer may take to exit after SIGTERM before it is killed.
TRAINER_STOP_GRACE_S = 10.0
POLL_S = 0.2
# How long a new trainer's warm-up (importing the objective) may hold back the first claim; a
# slower import then overlaps the first trial instead.
TRAINER_WARM_WAIT_S = 120.0


class WorkerInterrupted(BaseException):
    """SIGTERM/SIGINT reached the worker; a BaseException so nothing swallows it."""


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
    threads: int | None = None  # intra-op threads of the trainer (None: PyTorch's default; the CLI sizes it)
    max_retry: int = 3  # retries of a trial whose attempt died (over its chain of retries)
    # Fused trials (hpo._fused_worker): up to this many fusable trials train as one group; 1: off.
    fuse: int = 1


@dataclass
class WorkerSummary:
    finished: dict[str, int] = field(default_factory=lambda: {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0})
    stopped_because: str = ""
    signal_name: str | None = None  # set when a signal stopped the worker
    objective_broken: bool = False  # its first trials failed alike (hpo._first_failures)
    failing: bool = False  # stopped at --max-consecutive-failures

    @property
    def total(self) -> int:
        return sum(self.finished.values())

    @property
    def exit_code(self) -> int:
        if self.signal_name is not None:
            return 128 + int(signal.Signals[self.signal_name])
        if self.objective_broken:
            return 1
        return 1 if self.failing else 0


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
    return FailOutcome(True, -1, reason)


def heartbeat_interval(storage: BaseStorage) -> int | None:
    """Seconds between heartbeats, or None when the storage has heartbeats off."""
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if callable(getter) else None


def _inner(storage: BaseStorage) -> BaseStorage:
    """The storage under hpo's retrying layer: calls that must not block on an outage use it."""
    inner = getattr(storage, "inner", None)
    return inner if isinstance(inner, BaseStorage) else storage


class Heartbeat:
    """Records a heartbeat for a running trial every ``interval`` seconds from a daemon thread.

    Missed beats (the database is down) are not retried: the next interval beats again.
    """

    def __init__(self, storage: BaseStorage, trial_id: int) -> None:
        self._storage = _inner(storage)
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


class Interrupts:
    """SIGTERM/SIGINT only set a flag (and wake waits); the worker acts on it at its next check,
    so a storage transaction is never abandoned half-way."""

    def __init__(self) -> None:
        self.pending: str | None = None
        self.wake = threading.Event()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.pending = self.pending or signal.Signals(signum).name
        self.wake.set()

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

    def sleep(self, seconds: float) -> None:
        self.wake.wait(seconds)
        self.check()


class Prepared(NamedTuple):
    """A claimed trial ready to train: its Optuna trial, its job, and its system attributes as read
    while preparing it (unfinished trials are not in Optuna's cache: read once)."""

    trial: optuna.Trial
    job: TrialJob
    system_attrs: dict[str, Any]


class TrainerDied(Exception):
    def __init__(self, exitcode: int | None) -> None:
        super().__init__(describe_exit(exitcode))
        self.exitcode = exitcode


class Trainer:
    """The trainer child process (spawned; see :mod:`hpo.trainer`), started on first use and
    again after it died."""

    def __init__(self, threads: int | None, warm: TrialJob | None = None) -> None:
        """``warm``: a job standing for the trials to come; each new trainer is sent it to import
        their objective before the first one is claimed (see :func:`hpo.trainer._warm`)."""
        self.threads = threads
        self.warm = warm
        self._process: Any = None
        self._conn: Connection | None = None
        # Whether the current process answered "ready" (and its warm-up was sent and waited for).
        self._ready = False
        self._spawned_at = 0.0
        # Counts the trainers started: a message sent to one is not in a later one's pipe.
        self.generation = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def spawn(self) -> None:
        """Start a trainer process and return at once: :meth:`ensure_started` waits for it.

        ``hpo worker`` spawns its trainer before it opens the storage and imports the objective
        itself, so that the trainer's own imports (PyTorch, then ``torch._dynamo`` on its first
        optimizer: seconds) run on another core meanwhile instead of after them."""
        self.close()
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        # spawn copies the environment when the process starts: set the thread counts for it
        # (OpenMP/MKL read theirs at load time, PyTorch's pool is sized in hpo.trainer).
        names = (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        previous = {name: os.environ.get(name) for name in names}
        if self.threads is not None:
            os.environ.update(dict.fromkeys(names, str(self.threads)))
        try:
            process = context.Process(
                target=trainer_main, args=(child, os.getpid()), name="hpo-trainer", daemon=False
            )
            process.start()
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        child.close()
        self._process, self._conn = process, parent
        self._spawned_at = time.monotonic()
        self.generation += 1

    def ensure_started(self, interrupts: Interrupts) -> None:
        """A trainer that answered "ready" and did its warm-up (or waited TRAINER_WARM_WAIT_S for
        it): the one :meth:`spawn` started, or a new one if none runs (the first, or after one
        died)."""
        alive = self._process is not None and self._process.is_alive()
        if alive and self._ready:
            return
        if not alive:
            self.spawn()
        deadline = self._spawned_at + TRAINER_START_TIMEOUT_S
        warm_until: float | None = None  # set once the warm-up job is sent
        while True:
            try:
                message = self._receive(POLL_S)
                if message is not None and message[0] == "ready" and self.warm is not None:
                    self.send(("warm", asdict(self.warm)))  # answered ("warm",) once imported
                    warm_until = time.monotonic() + TRAINER_WARM_WAIT_S
                elif message is not None and message[0] in ("ready", "warm"):
                    self._ready = True
                    return
            except TrainerDied:
                if warm_until is None:
                    raise
                # Importing the objective killed the trainer (a crash in native code): start one
                # without the warm-up; the first trial meets the same crash and records it.
                self.warm = None
                self.close()
                self.ensure_started(interrupts)
                return
            interrupts.check()
            if warm_until is not None and time.monotonic() > warm_until:
                self._ready = True
                return  # a slow import: the first trial waits for it (poll drops the late answer)
            if warm_until is None and time.monotonic() > deadline:
                self.kill()
                raise HpoError(f"the trainer process did not start within {TRAINER_START_TIMEOUT_S:g}s")

    def send(self, message: tuple[Any, ...]) -> None:
        assert self._conn is not None
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise TrainerDied(self._exitcode()) from None

    def poll(self, timeout: float) -> tuple[Any, ...] | None:
        """The trainer's next message, None if none came within ``timeout``; TrainerDied if it died."""
        message = self._receive(timeout)
        return None if message == ("warm",) else message  # a warm-up answered after its wait

    def _receive(self, timeout: float) -> tuple[Any, ...] | None:
        assert self._conn is not None
        try:
            if self._conn.poll(timeout):
                return tuple(self._conn.recv())
        except (EOFError, ConnectionResetError, OSError):
            raise TrainerDied(self._exitcode()) from None
        if not self._process.is_alive():
            raise TrainerDied(self._exitcode())
        return None

    def _exitcode(self) -> int | None:
        self._process.join(timeout=5)
        return self._process.exitcode

    def kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        self.close()

    def stop(self) -> None:
        """End the trainer: SIGTERM (the training code stops where it is), then SIGKILL."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=TRAINER_STOP_GRACE_S)
        self.kill()

    def shutdown(self) -> None:
        """Ask an idle trainer to exit, then make sure it has."""
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.send(("exit",))
            self._process.join(timeout=TRAINER_STOP_GRACE_S)
        self.kill()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None
        self._process = None
        self._ready = False


class InlineTrainer(Trainer):
    """The trainer as a thread of this process (no isolation; see :func:`hpo.trainer.inline_main`)."""

    def __init__(self, objective: Objective, cache: dict[str, Any]) -> None:
        super().__init__(threads=None)
        self._objective = objective
        self._cache = cache

    def ensure_started(self, interrupts: Interrupts) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self.close()
        parent, child = multiprocessing.Pipe(duplex=True)
        thread = threading.Thread(
            target=inline_main, args=(child, self._objective, self._cache), name="hpo-trainer", daemon=True
        )
        thread.start()
        self._process, self._conn = _ThreadHandle(thread, child), parent
        self.generation += 1
        while self.poll(POLL_S) is None:
            interrupts.check()


class _ThreadHandle:
    """What :class:`Trainer` asks of its process, for a thread (which cannot be killed: closing
    its pipe ends it at its next message)."""

    pid = None
    exitcode = None

    def __init__(self, thread: threading.Thread, conn: Connection) -> None:
        self._thread = thread
        self._conn = conn

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout=min(timeout or 0.0, 1.0))

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


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


def _format_params(params: Mapping[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


@dataclass
class _Outcome:
    state: TrialState | None  # None: not ours to record any more (lease lost)
    note: str = ""
    frozen: FrozenTrial | None = None
    keep_checkpoint: bool = False


class Worker:
    """Runs the trials of one study: this process supervises, a trainer process trains."""

    def __init__(
        self,
        study: optuna.Study,
        spec: StudySpec,
        options: WorkerOptions,
        objective: str | Objective,
        console: Console | None = None,
        storage_patience: float = 300.0,
        cache: dict[str, Any] | None = None,
        after_trial: Callable[[TrialState | None, bool], None] | None = None,
        objective_path: Sequence[str] = (),
        trainer: Trainer | None = None,
    ) -> None:
        """``objective``: the allowed ``module:attribute`` (checked by the caller, see
        :mod:`hpo.policy`), trained in a trainer process; or an :class:`Objective` object, trained
        in a thread of this process with ``cache`` as its data cache (no crash isolation).
        ``after_trial(state, requeued)`` is called after each trial's line (``hpo compare``'s
        overall progress); state None: the trial was given up. ``objective_path``: folders the
        trainer looks in for the objective's module (chosen on this worker's command line, never
        by the storage; see :mod:`hpo._objective_path`). ``trainer``: a trainer already spawned
        (:meth:`Trainer.spawn`) with ``options.threads``, for a module objective; this worker
        sends it the warm-up and owns it from here on."""
        self.study = study
        self.spec = spec
        self.options = options
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.identity = worker_identity(options.label)
        self.interrupts = Interrupts()
        self.trainer: Trainer
        self.objective_object = objective if isinstance(objective, Objective) else None
        if isinstance(objective, Objective):
            self.objective = spec.objective
            self.trainer = InlineTrainer(objective, cache if cache is not None else {})
        self._definition = spec.definition()
        self.objective_path = tuple(objective_path)
        if not isinstance(objective, Objective):
            self.objective = objective
            warm = TrialJob(
                number=-1,
                definition=self._definition,
                objective=objective,
                params={},
                max_epochs=0,
                device=options.device,
                checkpoint_dir="",
                objective_path=self.objective_path,
            )
            if trainer is None or trainer.threads != options.threads:
                if trainer is not None:  # spawned for other thread counts: not this worker's
                    trainer.kill()
                trainer = Trainer(options.threads)
            trainer.warm = warm
            self.trainer = trainer
        self.storage_patience = storage_patience
        self._checkpoint_root = checkpoint_folder(options.checkpoint_root, study)
        self._printed_traceback = False
        self._first_failures = FirstFailures()
        self._fast: optuna.Study | None = None
        # The dashboard's per-metric figures (hpo._dashboard_data); never fail a trial.
        self.curves = CurvePublisher(
            _inner(_optuna.study_storage(study)),
            _optuna.study_id(study),
            spec.metric,
            spec.direction,
            self.say,
        )
        self._after_trial = after_trial
        self.counts: StudyCounts | None = None  # the study when the current trial was claimed
        study.pruner = make_pruner(spec.pruner, spec.budget.max_epochs)
        self._groups: FusedGroups | None = None
        if options.fuse > 1:
            from hpo._fused_worker import FusedGroups

            self._groups = FusedGroups(self, options.fuse)

    @property
    def direction(self) -> object:
        """The study's direction for progress figures; a list (no single best) when several."""
        return list(self.spec.directions) if self.spec.is_multi_objective else self.spec.direction

    # ------------------------------------------------------------------ output
    def say(self, message: str) -> None:
        prefix = f"[{self.options.label}] " if self.options.label else ""
        self.console.print(f"{prefix}{message}", markup=False)

    def _progress(self) -> EpochBar | None:
        if not (self.options.show_progress and self.console.is_terminal):
            return None
        return EpochBar(self.console, self.spec.metric)

    # ------------------------------------------------------------------ loop
    def run(self) -> WorkerSummary:
        summary = WorkerSummary()
        with self.interrupts.installed():
            try:
                self._loop(summary)
            except WorkerInterrupted as interrupt:
                summary.stopped_because = f"interrupted by {interrupt}"
                summary.signal_name = str(interrupt)
            finally:
                if self._groups is not None:  # a trial claimed for the next group: back to the queue
                    self._groups.release(f"worker stopped: {summary.stopped_because}")
                self.trainer.shutdown()
                # Decoded datasets no other trainer on this machine maps any more (hpo.shared_data).
                with contextlib.suppress(OSError):
                    sweep_unused()
        self.curves.finish()
        self.say(f"worker {self.identity} stopped: {summary.stopped_because}")
        return summary

    def _loop(self, summary: WorkerSummary) -> None:
        started = time.monotonic()
        consecutive_failures = 0
        interval = heartbeat_interval(_optuna.study_storage(self.study))
        stale_checked = -math.inf
        while True:
            self.interrupts.check()
            if self.options.n_trials is not None and summary.total >= self.options.n_trials:
                summary.stopped_because = f"ran its {self.options.n_trials} trial(s)"
                return
            holds_next = self._groups is not None and self._groups.holds_next
            # (trials claimed for the next fused group, before the timeout, still run)
            if (
                self.options.timeout is not None
                and time.monotonic() - started >= self.options.timeout
                and not holds_next
            ):
                summary.stopped_because = f"timeout of {self.options.timeout:g}s reached"
                return
            if interval is not None and time.monotonic() - stale_checked >= interval:
                # Other workers' dead trials are failed (and re-queued) at most once per
                # heartbeat interval: a trial cannot turn stale faster than that.
                for outcome in self._fail_stale():
                    self.say(f"failed a stale trial of a dead worker: {outcome.reason[:120]}")
                stale_checked = time.monotonic()
            self.trainer.ensure_started(self.interrupts)  # warm before the first claim
            results: list[tuple[int, TrialState | None]] | None
            if self._groups is not None:
                left = None if self.options.n_trials is None else self.options.n_trials - summary.total
                deadline = None if self.options.timeout is None else started + self.options.timeout
                results = self._groups.run_next(left, deadline)
            else:
                claimed = claim_trial(self.study, self.identity)
                results = None if claimed is None else [(claimed[0], self._run_trial(*claimed))]
            if results is None:
                stale_checked = -math.inf  # before concluding the study is done, look again
                if self._study_done(interval is not None):
                    summary.stopped_because = "no trials left in the study"
                    return
                self.interrupts.sleep(self.options.poll_interval)  # others' trials may be retried
                continue
            ended: list[TrialState] = []
            for trial_id, state in results:
                if state is None:
                    continue  # given up (lease lost): not this worker's result
                summary.finished[state.name] += 1
                if self._first_failures.ended(trial_id):
                    summary.stopped_because = self._first_failures.stop_message()
                    summary.objective_broken = True
                    return
                ended.append(state)
            if ended:
                # A fused group's members end together: a group that failed as a whole (its
                # trainer died) is one failure for this rule, not K of them.
                failed = all(state == TrialState.FAIL for state in ended)
                consecutive_failures = consecutive_failures + 1 if failed else 0
                if consecutive_failures >= self.options.max_consecutive_failures:
                    what = "trials" if self._groups is None else "trials or fused groups"
                    summary.failing = True
                    summary.stopped_because = (
                        f"{consecutive_failures} consecutive {what} failed; stopping this worker "
                        "(see each trial's fail_reason with `hpo status`)"
                    )
                    return

    def _fail_stale(self) -> list[FailOutcome]:
        storage = _optuna.study_storage(self.study)
        return with_retries(storage, lambda: fail_stale(storage, _optuna.study_id(self.study)))

    def _study_done(self, heartbeat_enabled: bool) -> bool:
        trials = _optuna.study_storage(self.study).get_all_trials(
            _optuna.study_id(self.study), deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)
        )
        if not trials:
            return True
        # Only wait on other workers' RUNNING trials if a dead worker's trial can be detected
        # (heartbeats) and re-queued; otherwise there is nothing this worker could pick up.
        return not heartbeat_enabled and all(t.state == TrialState.RUNNING for t in trials)

    # ------------------------------------------------------------------ one trial
    def _run_trial(self, trial_id: int, number: int) -> TrialState | None:
        t0 = time.monotonic()
        storage = _inner(_optuna.study_storage(self.study))  # for show: never waits out an outage
        study_id = _optuna.study_id(self.study)
        self.counts = read_counts(storage, study_id, self.spec.n_trials, self.direction)
        with Heartbeat(_optuna.study_storage(self.study), trial_id):
            try:
                outcome = self._prepare_and_supervise(trial_id, number)
            except WorkerInterrupted as interrupt:
                self.trainer.stop()
                outcome = self.record_failure(
                    trial_id, f"worker interrupted by {interrupt}", retry=True, keep_checkpoint=True
                )
                self.print_finished(number, outcome, time.monotonic() - t0)
                raise
        self.print_finished(number, outcome, time.monotonic() - t0)
        self.curves.trial_ended()
        return outcome.state

    def _prepare_and_supervise(self, trial_id: int, number: int) -> _Outcome:
        prepared = self.prepare(trial_id, number)
        return prepared if isinstance(prepared, _Outcome) else self.supervise(prepared.trial, prepared.job)

    def prepare(self, trial_id: int, number: int) -> _Outcome | Prepared:
        """The claimed trial's parameters (asked of the sampler) and its job; an outcome when
        preparing it failed (recorded)."""
        storage = _optuna.study_storage(self.study)
        try:
            # A sampler per trial, seeded from (study seed, trial number): reproducible for one
            # worker, parallel workers never draw the same random configuration from equal RNG
            # states, and studies seeded s and s + 1 share no random stream (see trial_seed).
            self.study.sampler = make_sampler(self.spec, seed=trial_seed(self.spec.sampler_seed, number))
            if hasattr(self.study.sampler, "wait_check"):  # BOHB waiting for a rung: stoppable
                self.study.sampler.wait_check = self.interrupts.check
            _ensure_cached(self.study, trial_id)
            trial = _optuna.trial_for(self.study, trial_id)
            # Read after Trial(): the sampler's before_trial may have set this trial's budget.
            system_attrs = storage.get_trial_system_attrs(trial_id)
            with _optuna.deferred_param_writes(trial) as sampled:
                params = suggest(trial, self.spec.space)
            # One transaction for the whole configuration, not one per parameter (4 ms each on
            # SQLite: most of the time between claiming a trial and training it).
            set_trial_params(storage, trial_id, sampled)
            self._continue_parent(number, system_attrs)
        except (WorkerInterrupted, StorageUnavailable):
            raise
        except Exception as exc:  # a sampler or space error fails this trial, not the worker
            return self.record_failure(trial_id, f"preparing the trial failed: {type(exc).__name__}: {exc}")
        job = TrialJob(
            number=number,
            definition=self._definition,
            objective=self.objective,
            params=dict(params),
            max_epochs=int(system_attrs.get(BUDGET_ATTR, self.spec.budget.max_epochs)),
            device=self.options.device,
            checkpoint_dir=str(self._checkpoint_dir(number, system_attrs)),
            prunes=not isinstance(self.study.pruner, optuna.pruners.NopPruner),
            objective_path=self.objective_path,
        )
        return Prepared(trial, job, system_attrs)

    def supervise(self, trial: optuna.Trial, job: TrialJob) -> _Outcome:
        trial_id = _optuna.trial_id(trial)
        recorder = Recorder(self.fast_study(), trial_id, self.say)
        limit = self.spec.budget.trial_timeout
        progress = self._progress()
        with contextlib.ExitStack() as stack:
            if progress is not None:
                stack.enter_context(progress.shown(job.number, job.max_epochs, self.counts))
            try:
                self.trainer.ensure_started(self.interrupts)
                started = time.monotonic()
                self.trainer.send(job.to_message())
                while True:
                    self.interrupts.check()
                    if limit is not None and time.monotonic() - started > limit:
                        self.trainer.kill()
                        return self.record_failure(
                            trial_id, f"exceeded budget.trial_timeout of {limit:g}s; the trainer was stopped"
                        )
                    recorder.retry_due()
                    if recorder.lost:
                        # Another worker runs this trial's retry now, from the same checkpoint
                        # folder: stop training at once rather than write into it alongside.
                        self.trainer.stop()
                        return self.lost_outcome(job.number)
                    message = self.trainer.poll(POLL_S)
                    if message is None:
                        continue
                    kind = message[0]
                    if kind == "report":
                        recorder.report(float(message[1]), int(message[2]))
                        if progress is not None:
                            progress.epoch(int(message[2]), float(message[1]))
                    elif kind == "should_prune":
                        answer = ("abort",) if recorder.lost else ("prune", recorder.should_prune())
                        self.trainer.send(answer)
                    elif kind == "user_attr":
                        recorder.user_attr(str(message[1]), message[2])
                    elif kind == "system_attr":
                        recorder.system_attr(str(message[1]), message[2])
                    elif kind == "artifact":
                        self.trainer.send(self.upload(trial, str(message[1])))
                    else:
                        return self.conclude(trial, recorder, message)
            except TrainerDied as died:
                self.trainer.close()
                recorder.drain_blocking(self.storage_patience, self.interrupts)
                if recorder.lost:
                    return self.lost_outcome(job.number)
                return self.record_failure(trial_id, str(died), retry=True, keep_checkpoint=True)

    def fast_study(self) -> optuna.Study:
        """The study on the storage under the retrying layer, for writes that must not block."""
        if self._fast is None:
            self._fast = optuna.Study(
                self.study.study_name, storage=_inner(_optuna.study_storage(self.study))
            )
        self._fast.pruner = self.study.pruner
        return self._fast

    def conclude(self, trial: optuna.Trial, recorder: Recorder, message: tuple[Any, ...]) -> _Outcome:
        trial_id = _optuna.trial_id(trial)
        recorder.drain_blocking(self.storage_patience, self.interrupts)
        if recorder.lost or message[0] == "aborted":
            return self.lost_outcome(trial.number)
        kind = message[0]
        if kind == "failed":
            exc_type, text, details = str(message[1]), str(message[2]), str(message[3])
            if not self._printed_traceback:
                self._printed_traceback = True  # the first failure in full, the rest in one line
                self.say(details.rstrip())
            reason = f"{exc_type}: {text}"
            storage = _optuna.study_storage(self.study)
            # Best effort: the failure itself is recorded below whether or not these two writes land.
            with contextlib.suppress(Exception):
                storage.set_trial_system_attr(trial_id, TRACEBACK_ATTR, details[-TRACEBACK_LIMIT:])
            with contextlib.suppress(Exception):  # the dashboard shows neither system attrs nor long ones
                save_failure_note(
                    storage, _optuna.study_id(self.study), trial_id, reason, details[-TRACEBACK_LIMIT:]
                )
            if message[4:5] == (GROUP_FAILURE,):
                # Raised for a whole fused group (out of memory for K members together, a bug of
                # the fused trainer), not by this member: each member's retry runs alone
                # (hpo._fused_worker), from its checkpoint. Best effort: unmarked, it fuses again.
                with contextlib.suppress(Exception):
                    storage.set_trial_system_attr(
                        trial_id, RETRY_ALONE_ATTR, f"its fused group failed ({reason[:300]})"
                    )
                reason = f"{reason} (raised for its whole fused group)"
                self._first_failures.deferred(trial_id)  # the retries, alone, tell if it is broken
                return self.record_failure(trial_id, reason, retry=True, keep_checkpoint=True)
            if self._first_failures.failed(trial_id, trial.number, TrialError(exc_type, text, details)):
                # This worker's first trials all failed alike: re-queue them, don't spend the budget.
                reason = f"{reason}; {BROKEN_NOTE}"
                self._first_failures.requeue_earlier(self.study, reason, self.options.max_retry)
                return self.record_failure(trial_id, reason, retry=True)
            return self.record_failure(trial_id, reason)
        try:
            if kind == "done":
                frozen = self.study.tell(trial, _told(message[1]), skip_if_finished=True)
            else:
                frozen = self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            return self.lost_outcome(trial.number)
        expected = TrialState.COMPLETE if kind == "done" else TrialState.PRUNED
        if frozen.state != expected:
            return self.lost_outcome(trial.number)  # finished by someone else first: not written twice
        note = str(message[1]) if kind == "pruned" else ""
        return _Outcome(frozen.state, note, frozen)

    def lost_outcome(self, number: int) -> _Outcome:
        note = (
            "given up: its lease expired while this worker could not reach the database, and another "
            "worker failed and re-queued it"
        )
        return _Outcome(None, note, keep_checkpoint=True)

    def record_failure(
        self, trial_id: int, reason: str, *, retry: bool = False, keep_checkpoint: bool = False
    ) -> _Outcome:
        outcome = fail_and_requeue(
            self.study, trial_id, reason, retry=retry, max_retry=self.options.max_retry
        )
        if not outcome.failed:
            return self.lost_outcome(_optuna.study_storage(self.study).get_trial(trial_id).number)
        retried = outcome.retry_trial_id is not None
        note = f"{outcome.reason}; re-queued" if retried else outcome.reason
        frozen = _optuna.study_storage(self.study).get_trial(trial_id)
        return _Outcome(TrialState.FAIL, note, frozen, keep_checkpoint=keep_checkpoint and retried)

    def upload(self, trial: optuna.Trial, path: str) -> tuple[str, str]:
        from hpo.artifacts import upload_trial_artifact

        try:
            return ("artifact_id", upload_trial_artifact(trial, path))
        except Exception as exc:
            return ("error", f"{type(exc).__name__}: {exc}")

    def _checkpoint_dir(self, number: int, system_attrs: Mapping[str, Any]) -> Path:
        return trial_checkpoint_dir(self._checkpoint_root, number, system_attrs)

    def _continue_parent(self, number: int, system_attrs: Mapping[str, Any]) -> None:
        """A promoted configuration starts from its parent's checkpoint (hpo._continuation)."""
        storage = _optuna.study_storage(self.study)
        try:
            parent = take_over_parent_checkpoint(
                storage, _optuna.study_id(self.study), self._checkpoint_root, number, system_attrs
            )
        except OSError as exc:  # a full or read-only disk: train from scratch, as hpbandster does
            self.say(
                f"trial {number}: could not take over its parent's checkpoint ({exc}); training from scratch"
            )
            return
        if parent is not None:
            self.say(f"trial {number} continues trial {parent}'s checkpoint")

    def print_finished(self, number: int, outcome: _Outcome, seconds: float) -> None:
        frozen = outcome.frozen
        if frozen is not None and not outcome.keep_checkpoint and not keeps_checkpoint(frozen.system_attrs):
            # Finished for good by this worker: its checkpoint can no longer be resumed (unless a
            # promoted configuration may still continue it: hpo._continuation).
            shutil.rmtree(self._checkpoint_dir(frozen.number, frozen.system_attrs), ignore_errors=True)
        released_trials = getattr(self.study.sampler, "released_trials", None)
        if frozen is not None and released_trials is not None:
            # Checkpoints kept for a promotion that was decided without them (hpo._continuation).
            with contextlib.suppress(OSError):
                trials = self.study.get_trials(deepcopy=False)
                release_checkpoints(self._checkpoint_root, trials, released_trials(self.study))
        state = outcome.state.name if outcome.state is not None else "ABANDONED"
        values = frozen.values if frozen is not None else None
        label = "values" if values and len(values) > 1 else "value"
        value = f" {label}={', '.join(f'{v:.6g}' for v in values)}" if values else ""
        params = f" [{_format_params(frozen.params)}]" if frozen is not None else ""
        suffix = f" ({outcome.note})" if outcome.note else ""
        best = self.counts.best if self.counts is not None else None
        if outcome.state == TrialState.COMPLETE and values and len(values) == 1:
            best = better(self.direction, best, values[0])
        place = finish_note(self.counts, best)
        place = f"; {place}" if place else ""
        self.say(f"trial {number} {state}{value}{params} {seconds:.1f}s{suffix}{place}")
        if self._after_trial is not None:
            self._after_trial(outcome.state, outcome.note.endswith("; re-queued"))


def _told(value: Any) -> float | list[float]:
    """The trainer's "done" value for ``Study.tell``: one number, or a multi-objective trial's list."""
    return [float(v) for v in value] if isinstance(value, list) else float(value)


def _ensure_cached(study: optuna.Study, trial_id: int) -> None:
    """Make the claimed trial known to the study's trial cache.

    ``optuna.load_study`` wraps the RDB storage in a cache that parameter writes go through; a
    trial queued after the cache last read the study (a retry queued by another worker, say) is
    unknown there until the study's trials are read again. Reading them costs a query over every
    unfinished trial, so it is done only when the cache lacks the trial.
    """
    storage = _optuna.study_storage(study)
    if _optuna.is_cached(storage) and not _optuna.cache_knows_trial(storage, trial_id):
        storage.get_all_trials(_optuna.study_id(study), deepcopy=False, states=(TrialState.RUNNING,))
