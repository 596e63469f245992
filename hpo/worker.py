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

The parts behind it: claiming and the lease (:mod:`hpo._lease`), the handle on the trainer
process (:mod:`hpo._trainer_handle`; the process itself is :mod:`hpo.trainer`), a trial's
records written through outages (:mod:`hpo._recorder`), signals (:mod:`hpo._interrupts`), and
fused groups (:mod:`hpo._fused_worker`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from hpo import _optuna
from hpo._continuation import (
    keeps_checkpoint,
    release_checkpoints,
    take_over_parent_checkpoint,
)
from hpo._dashboard_data import CurvePublisher
from hpo._first_failures import BROKEN_NOTE, INPUT_NOTE, FirstFailures, TrialError
from hpo._interrupts import Interrupts, WorkerInterrupted
from hpo._lease import (
    Heartbeat,
    claim_trial,
    fail_and_requeue,
    heartbeat_interval,
    inner_storage,
    worker_identity,
)
from hpo._progress import EpochBar, StudyCounts, better, finish_note, read_counts
from hpo._rdb import (
    RETRY_ALONE_ATTR,
    FailOutcome,
    fail_stale,
    set_trial_params,
    with_retries,
)
from hpo._recorder import Recorder
from hpo._trainer_handle import POLL_S, InlineTrainer, Trainer, TrainerDied
from hpo._trial_note import save_failure_note
from hpo.errors import INPUT_ERROR_TYPES, HpoError
from hpo.objective import BUDGET_ATTR, Objective
from hpo.resilient import StorageUnavailable
from hpo.samplers import make_pruner, make_sampler, trial_seed
from hpo.shared_data import sweep_unused
from hpo.space import suggest
from hpo.spec import StudySpec
from hpo.studies import check_checkpoint_root, checkpoint_folder, trial_checkpoint_dir
from hpo.trainer import GROUP_FAILURE, TrialJob, warm_job

if TYPE_CHECKING:
    from hpo._fused_worker import FusedGroups

T = TypeVar("T")
TRACEBACK_ATTR = "hpo:traceback"
# A traceback is stored with its failed trial up to this many characters (its last ones).
TRACEBACK_LIMIT = 8000


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


class Prepared(NamedTuple):
    """A claimed trial ready to train: its Optuna trial, its job, and its system attributes as read
    while preparing it (unfinished trials are not in Optuna's cache: read once)."""

    trial: optuna.Trial
    job: TrialJob
    system_attrs: dict[str, Any]


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
            warm = warm_job(self._definition, objective, self.objective_path, options.device)
            if trainer is None or trainer.threads != options.threads:
                if trainer is not None:  # spawned for other thread counts: not this worker's
                    trainer.kill()
                trainer = Trainer(options.threads)
            trainer.warm = warm
            self.trainer = trainer
        self.storage_patience = storage_patience
        check_checkpoint_root(options.checkpoint_root)
        self._checkpoint_root = checkpoint_folder(options.checkpoint_root, study)
        self._printed_traceback = False
        self._first_failures = FirstFailures()
        self._fast: optuna.Study | None = None
        # The dashboard's per-metric figures (hpo._dashboard_data); never fail a trial.
        self.curves = CurvePublisher(
            inner_storage(_optuna.study_storage(study)),
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
            if self._groups is None or not self._groups.sent_ahead:
                # Warm before the first claim. A trainer sent the next fused group ahead is
                # checked by that group: restarted here, its death would go unrecorded.
                try:
                    self.trainer.ensure_started(self.interrupts)
                except TrainerDied as died:  # no trial is claimed yet: nothing to record
                    raise HpoError(
                        f"{died}; stopping this worker before it claims a trial (fix: free memory "
                        "on this machine, and read any error the trainer printed above)"
                    ) from None
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
        storage = inner_storage(_optuna.study_storage(self.study))  # for show: never waits out an outage
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
                self.study.study_name, storage=inner_storage(_optuna.study_storage(self.study))
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
                # A wrong study file or dataset path: its one line says what to fix.
                self.say(f"error: {text}" if exc_type in INPUT_ERROR_TYPES else details.rstrip())
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
                note = INPUT_NOTE if exc_type in INPUT_ERROR_TYPES else BROKEN_NOTE
                reason = f"{reason}; {note}"
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
            "given up: its lease expired (this worker's heartbeats did not reach the database in time: "
            "an outage, or this worker paused or starved of CPU), and another worker failed and re-queued it"
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
