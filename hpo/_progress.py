"""Progress as people read it: where a trial stands in its study, the best value so far, and how
long a comparison has left.

Computing is kept apart from drawing: :func:`count_trials`, :func:`overall_line` and friends are
pure functions of trials and numbers (unit-tested as such); :class:`EpochBar` only draws them.

Counting rules (also what ``hpo status`` prints):

* a study's trials are *slots* (the queued trials, one per planned configuration) and *retries*
  (a trial re-queued because its attempt died; it carries ``failed_trial``, see
  :mod:`hpo._rdb`). A failed attempt that was retried is counted as ``retried``, not as a
  finished or planned trial: its slot is finished only when its last attempt is;
* planned ``N`` is the stored ``n_trials``, or the number of slots if there are more (``hpo extend``
  queued more since the caller read the definition, or trials were added outside hpo);
* done = complete + pruned + failed (failed: final failures only), and
  done + running + waiting = the number of slots, which is ``N`` once the study's queue is complete;
* a running trial's position ``k`` ("trial k/N") is done + running at the moment it was claimed
  (itself included): trials claimed one after the other get 1, 2, 3, ...; trials claimed side by
  side by several workers get distinct numbers; a retry takes the place of the attempt it retries.
  ``k`` is clamped to ``1..N``, so it never exceeds ``N`` (stale trials of dead workers, still
  RUNNING until they are failed, can otherwise push it past).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Mirrors hpo._rdb (not imported: it pulls in SQLAlchemy, and this module serves `hpo status`).
_FAILED_TRIAL_ATTR = "failed_trial"
_RETRY_OF_ATTR = "hpo:retry_of"
_RETRY_HISTORY_ATTR = "retry_history"


@dataclass(frozen=True)
class StudyCounts:
    """A study's trials counted per planned configuration (see the module docstring)."""

    planned: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # final failures: attempts that failed and were not retried
    running: int = 0
    waiting: int = 0
    retried: int = 0  # failed attempts re-queued as a new trial (not counted as trials)
    best: float | None = None  # best value of a COMPLETE trial (single-objective studies)

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def slots(self) -> int:
        return self.done + self.running + self.waiting

    @property
    def position(self) -> int:
        """``k`` of "trial k/N" for a trial claimed when these counts were taken (it is RUNNING)."""
        return min(self.planned, max(1, self.done + self.running)) if self.planned else 0

    def done_text(self) -> str:
        """``12/20 done``."""
        return f"{self.done}/{self.planned} done"

    def states_text(self) -> str:
        """``complete=10  pruned=1  fail=1  running=2  waiting=6  retried=3`` (retried: attempts)."""
        parts = {
            "complete": self.complete,
            "pruned": self.pruned,
            "fail": self.failed,
            "running": self.running,
            "waiting": self.waiting,
            "retried": self.retried,
        }
        return "  ".join(f"{name}={n}" for name, n in parts.items())

    def after(self, trial: FrozenTrial, direction: object) -> StudyCounts | None:
        """These counts once ``trial``, RUNNING when they were taken, has finished COMPLETE or
        PRUNED (what re-reading the study would give if nothing else changed); None for any
        other state (a failure may have queued a retry: read the study again)."""
        running = max(0, self.running - 1)
        if trial.state == TrialState.COMPLETE:
            best = better(direction, self.best, _single_value(trial))
            return replace(self, complete=self.complete + 1, running=running, best=best)
        if trial.state == TrialState.PRUNED:
            return replace(self, pruned=self.pruned + 1, running=running)
        return None


def _single_value(trial: FrozenTrial) -> float | None:
    values = trial.values
    if values is None or len(values) != 1 or math.isnan(values[0]):
        return None
    return float(values[0])


def better(direction: object, best: float | None, value: float | None) -> float | None:
    """The better of ``best`` and ``value`` for ``direction`` ("minimize"/"maximize"); None for any
    other direction (a multi-objective study has no single best value)."""
    if direction not in ("minimize", "maximize"):
        return None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return best
    if best is None:
        return value
    return min(best, value) if direction == "minimize" else max(best, value)


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the attempts that were retried: named by a retry's ``hpo:retry_of`` (its direct
    predecessor) or in its ``retry_history`` (every attempt of its chain before it)."""
    numbers: set[int] = set()
    for trial in trials:
        attrs = trial.system_attrs
        if isinstance(attrs.get(_RETRY_OF_ATTR), int):
            numbers.add(attrs[_RETRY_OF_ATTR])
        history = attrs.get(_RETRY_HISTORY_ATTR)
        if isinstance(history, list):
            numbers.update(n for n in history if isinstance(n, int))
    return numbers


def count_trials(trials: Iterable[FrozenTrial], planned: int, direction: object) -> StudyCounts:
    """Count ``trials`` of a study whose stored ``n_trials`` is ``planned`` (module docstring).

    ``direction`` is the study's ``direction:`` ("minimize"/"maximize"); any other value (a list,
    for a multi-objective study) leaves ``best`` None.
    """
    trials = list(trials)
    retried = retried_numbers(trials)
    counts = dict.fromkeys(("complete", "pruned", "failed", "running", "waiting", "retried"), 0)
    best: float | None = None
    for trial in trials:
        state = trial.state
        if state == TrialState.FAIL and trial.number in retried:
            counts["retried"] += 1
        elif state == TrialState.FAIL:
            counts["failed"] += 1
        elif state == TrialState.COMPLETE:
            counts["complete"] += 1
            best = better(direction, best, _single_value(trial))
        elif state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif state == TrialState.RUNNING:
            counts["running"] += 1
        elif state == TrialState.WAITING:
            counts["waiting"] += 1
    slots = sum(counts.values()) - counts["retried"]
    return StudyCounts(planned=max(planned, slots), best=best, **counts)


def read_counts(storage: BaseStorage, study_id: int, planned: int, direction: object) -> StudyCounts | None:
    """:func:`count_trials` over the study's trials in ``storage``; None if they cannot be read
    now (progress is for show: a storage error here never holds up or fails a trial, so pass a
    storage without hpo's waiting-out retries)."""
    try:
        trials = storage.get_all_trials(study_id, deepcopy=False)
    except Exception:
        return None
    return count_trials(trials, planned, direction)


# Lines printed to a pipe or file are never wrapped: a table or a long ``params`` line stays
# whole (rich otherwise wraps at 80 columns when stdout is not a terminal, splitting numbers).
UNWRAPPED_WIDTH = 100_000


def report_console() -> Console:
    """A console for reports on stdout (``hpo status``): the terminal's width on a terminal, and
    when piped a width no line reaches, so nothing is wrapped (tables take their natural width)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = UNWRAPPED_WIDTH
    return console


def format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def trial_label(number: int, counts: StudyCounts | None) -> str:
    """The bar's label: ``trial 3/20 (#7)``, or ``trial #7`` when the counts are unknown."""
    if counts is None or not counts.planned:
        return f"trial #{number}"
    return f"trial {counts.position}/{counts.planned} (#{number})"


def epoch_text(metric: object, value: float | None, best: float | None) -> str:
    """The bar's figures: ``loss=0.1234  best=0.1`` (the study's best before this trial)."""
    name = metric if isinstance(metric, str) else "value"
    return f"{name}={format_value(value)}  best={format_value(best)}"


def finish_note(counts: StudyCounts | None, best: float | None) -> str:
    """What the line printed when a trial ends adds: ``trial 3/20 of the study, best 0.41``."""
    if counts is None or not counts.planned:
        return ""
    note = f"trial {counts.position}/{counts.planned} of the study"
    return note if best is None else f"{note}, best {format_value(best)}"


class EpochBar:
    """The live bar of one trial's epochs (a terminal only): label, bar, epochs, the latest value
    of the study's metric, the study's best value so far, elapsed time."""

    def __init__(self, console: Console, metric: object) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._metric = metric
        self._best: float | None = None
        self._task: Any = None

    @contextlib.contextmanager
    def shown(self, number: int, epochs: int, counts: StudyCounts | None) -> Iterator[EpochBar]:
        self._best = counts.best if counts is not None else None
        with self._progress:
            self._task = self._progress.add_task(
                trial_label(number, counts), total=epochs, figures=epoch_text(self._metric, None, self._best)
            )
            yield self

    def renderable(self) -> RenderableType:
        """What the bar draws now (for a console that records it)."""
        return self._progress.get_renderable()

    def epoch(self, step: int, value: float) -> None:
        if self._task is not None:
            figures = epoch_text(self._metric, value, self._best)
            self._progress.update(self._task, completed=step, figures=figures)


# ------------------------------------------------------------------ a comparison's overall progress


def format_duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h02m``."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def eta_seconds(total: int, done: int, done_at_start: int, elapsed: float) -> float | None:
    """Seconds left at the rate of the trials finished since the start (``done - done_at_start``
    in ``elapsed`` seconds); None before the first one, 0 when all are done."""
    if done >= total:
        return 0.0
    finished_here = done - done_at_start
    if finished_here <= 0 or elapsed <= 0:
        return None
    return (total - done) * elapsed / finished_here


def overall_line(total: int, done: int, done_at_start: int, elapsed: float) -> str:
    """``compare: 37/120 trials done (31%), 1m12s elapsed, about 2m30s left``."""
    done = min(done, total)
    percent = 100 * done // total if total else 100
    eta = eta_seconds(total, done, done_at_start, elapsed)
    left = "estimating time left" if eta is None else f"about {format_duration(eta)} left"
    return f"compare: {done}/{total} trials done ({percent}%), {format_duration(elapsed)} elapsed, {left}"


class ComparisonProgress:
    """A comparison's trials done over all its studies, and the time left at the rate they finish.

    ``done_at_start`` is read from the storage when the comparison (re)starts; after that the
    trials this process finishes are counted (a failed attempt that was re-queued finishes nothing).
    Trials other machines' workers finish meanwhile are not seen, so the estimate errs long.
    """

    def __init__(self, total: int, done_at_start: int, started: float) -> None:
        self.total = total
        self.done_at_start = min(done_at_start, total)
        self.done = self.done_at_start
        self.started = started

    def trial_ended(self, state: TrialState | None, requeued: bool) -> None:
        if state is not None and not requeued:
            self.done = min(self.total, self.done + 1)

    def line(self, now: float) -> str:
        return overall_line(self.total, self.done, self.done_at_start, now - self.started)
