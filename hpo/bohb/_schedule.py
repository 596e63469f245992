"""Hyperband's bracket plan, computed exactly as hpbandster's BOHB optimizer computes it, and the
assignment of the next trial to a slot of that plan from the state rebuilt out of the storage.

Vocabulary (hpbandster's): the plan is an endless sequence of *brackets* (hpbandster's iterations);
bracket ``i`` runs successive halving with ``num_configs[r]`` configurations at ``budgets[r]`` in its
*stage* (rung) ``r``. Each configuration is identified by hpbandster's ``config_id`` — ``(bracket,
stage it was created in, index)`` — and keeps it when it is promoted. A *slot* is one position of one
stage; each trial of a BOHB study fills exactly one slot.

With a trial budget (``n_trials``), the plan is fitted to it: a bracket is opened only when the
trials left can fill all of its slots; when none of the brackets of a cycle fits, the leftover trials
(fewer than the cycle's last bracket) each evaluate a new configuration at ``max_budget``, in a
partly filled copy of that last bracket (a single stage, so no rung is cut). While every open
bracket waits for a rung to finish and no further bracket may be opened, a new trial has to wait.

Everything here is a pure function of its arguments, so any worker on any machine computes the same
plan from the same database rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

ConfigId = tuple[int, int, int]
RungKey = tuple[int, int]  # (bracket, stage)


@dataclass(frozen=True)
class Bracket:
    """One successive-halving run: ``num_configs[r]`` configurations at ``budgets[r]``."""

    index: int
    num_configs: tuple[int, ...]
    budgets: tuple[float, ...]

    @property
    def evaluations(self) -> int:
        return sum(self.num_configs)

    @property
    def total_budget(self) -> float:
        return sum(n * b for n, b in zip(self.num_configs, self.budgets, strict=True))


@dataclass(frozen=True)
class HyperbandSchedule:
    """The bracket plan of hpbandster's ``BOHB``/``HyperBand`` optimizers for one (min, max, eta).

    Budgets are ``max_budget * eta**-k``; their number is hpbandster's ``max_SH_iter``, so ``min_budget``
    itself is only used when ``max_budget / min_budget`` is a power of ``eta`` (as in hpbandster).
    Brackets cycle from the most exploratory (many configurations at the smallest budget) to plain
    random search at ``max_budget``.
    """

    min_budget: float
    max_budget: float
    eta: float = 3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_budget) and self.min_budget > 0):
            raise ValueError(f"min_budget must be a positive number, got {self.min_budget!r}")
        if not (math.isfinite(self.max_budget) and self.max_budget >= self.min_budget):
            raise ValueError(
                f"max_budget must be at least min_budget={self.min_budget}, got {self.max_budget!r}"
            )
        if not (math.isfinite(self.eta) and self.eta >= 2):
            raise ValueError(f"eta must be at least 2 (hpbandster's requirement), got {self.eta!r}")

    # The expressions below are hpbandster 0.7.4's (optimizers/bohb.py), numpy included, so that the
    # floating-point results (e.g. how log(min/max)/log(eta) truncates) are bit for bit the same.
    @property
    def max_sh_iter(self) -> int:
        """How many distinct budgets, and so how many brackets per cycle."""
        return -int(np.log(self.min_budget / self.max_budget) / np.log(self.eta)) + 1

    @property
    def budgets(self) -> tuple[float, ...]:
        n = self.max_sh_iter
        return tuple(float(b) for b in self.max_budget * np.power(self.eta, -np.linspace(n - 1, 0, n)))

    def bracket(self, index: int) -> Bracket:
        """Bracket ``index`` (0, 1, 2, ...), the same as hpbandster's ``get_next_iteration(index)``."""
        if index < 0:
            raise ValueError(f"bracket index must be >= 0, got {index}")
        s = self.max_sh_iter - 1 - (index % self.max_sh_iter)
        n0 = int(np.floor(self.max_sh_iter / (s + 1)) * self.eta**s)
        num_configs = tuple(max(int(n0 * (self.eta ** (-i))), 1) for i in range(s + 1))
        return Bracket(index, num_configs, self.budgets[-s - 1 :])

    def cycle(self) -> tuple[Bracket, ...]:
        """The brackets of one full Hyperband cycle (the plan repeats it)."""
        return tuple(self.bracket(i) for i in range(self.max_sh_iter))


def budget_epochs(budget: float) -> int:
    """Whole epochs for a (possibly fractional) budget: rounded half up, at least one."""
    return max(1, math.floor(budget + 0.5))


@dataclass(frozen=True)
class SlotRun:
    """One trial's claim on a slot, as rebuilt from the storage.

    ``loss`` is the trial's value turned into a loss (negated when maximizing), or +inf when the trial
    did not complete with a finite value (hpbandster's treatment of crashed runs). ``attempt`` counts
    the times the slot was handed on to a trial created before the attempt it replaces (see
    :func:`latest_runs`); an ordinary retry is created after the attempt it replaces and keeps it.
    """

    number: int
    bracket: int
    stage: int
    slot: int
    config: ConfigId
    finished: bool
    loss: float
    attempt: int = 0


@dataclass(frozen=True)
class Assignment:
    """The slot given to a new trial; ``promoted`` when its configuration ran at the previous stage."""

    bracket: int
    stage: int
    slot: int
    config: ConfigId
    budget: float
    promoted: bool


def latest_runs(runs: Iterable[SlotRun]) -> dict[tuple[int, int, int], SlotRun]:
    """The current attempt of every slot: a re-queued (retried) trial supersedes the one it replaces.

    The current attempt is the one with the highest ``(attempt, number)``: a retry has a higher trial
    number than the attempt it replaces, and a slot handed on to an older trial has a higher attempt.
    """
    latest: dict[tuple[int, int, int], SlotRun] = {}
    for run in runs:
        key = (run.bracket, run.stage, run.slot)
        if key not in latest or (run.attempt, run.number) > (latest[key].attempt, latest[key].number):
            latest[key] = run
    return latest


def promote(rung: Iterable[SlotRun], k: int) -> tuple[ConfigId, ...]:
    """hpbandster's successive-halving step: the ``k`` lowest finite losses go on.

    Crashed (infinite-loss) runs are never promoted, so fewer than ``k`` may go on; the stage's free
    slots then get new configurations, as hpbandster's ``get_next_run`` does. Ties go to the older
    configuration; the promoted ones keep hpbandster's order (the order they were created in).
    """
    finite = [run for run in rung if math.isfinite(run.loss)]
    best = sorted(finite, key=lambda run: (run.loss, run.config))[:k]
    return tuple(sorted(run.config for run in best))


def next_assignment(
    schedule: HyperbandSchedule,
    runs: Iterable[SlotRun],
    decisions: Mapping[RungKey, tuple[ConfigId, ...]],
    n_trials: int | None = None,
) -> tuple[Assignment | None, dict[RungKey, tuple[ConfigId, ...]]]:
    """The slot for the next trial (None: it must wait), and the promotion decisions taken to find it.

    Like hpbandster's master, the open brackets are asked in order: a bracket offers a free slot of
    its current stage; a stage whose slots are all taken but whose runs are not all finished makes the
    bracket wait, and the next bracket is asked (a new one is opened when none has a slot). When a
    stage has finished, which configurations go on is decided once, returned in the second value,
    and must be stored by the caller, so that a result arriving later (a retried trial) cannot change
    a decision other workers have already acted on.

    ``n_trials`` is the study's trial budget: the number of slots that may be filled, over all
    brackets (a retry refills its slot and takes no new one). None is hpbandster's endless plan.
    With a budget, every open bracket has a *quota*: its evaluations, as far as the budget still
    covers them after the brackets opened before it (:func:`bracket_quotas`); a bracket offers slots
    only within its quota, and a new bracket is opened only within the budget:

    * the next bracket of the plan when the trials left fill all of its evaluations;
    * else the first of the following brackets of the cycle that they fill (a smaller one);
    * else, fewer trials being left than the cycle's last, single-stage bracket (``max_sh_iter``
      configurations at ``max_budget``) has evaluations, the next such bracket, with a quota of the
      trials left: each leftover trial evaluates a new configuration at ``max_budget``.

    When the budget is spent, None is returned while an open bracket still has slots within its
    quota (they open when a running stage finishes: the trial must wait). A trial beyond the budget
    (more trials than ``n_trials``) is given a new configuration at ``max_budget``, as a leftover
    trial is, rather than left waiting for ever.
    """
    latest = latest_runs(runs)
    by_rung: dict[RungKey, dict[int, SlotRun]] = {}
    filled: dict[int, int] = {}
    for (bracket_index, stage, slot), run in latest.items():
        by_rung.setdefault((bracket_index, stage), {})[slot] = run
        filled[bracket_index] = filled.get(bracket_index, 0) + 1
    # Every open bracket holds slot 0 of its stage 0; indices skipped for a smaller bracket hold none.
    opened = sorted(filled)
    quotas = bracket_quotas(schedule, opened, n_trials)
    known = dict(decisions)
    new: dict[RungKey, tuple[ConfigId, ...]] = {}

    def free_slot(index: int) -> Assignment | None:
        bracket = schedule.bracket(index)
        for stage, size in enumerate(bracket.num_configs):
            promoted: tuple[ConfigId, ...] = ()
            if stage > 0:
                key = (index, stage)
                if key not in known:
                    previous = by_rung.get((index, stage - 1), {})
                    finished = all(run.finished for run in previous.values())
                    if len(previous) < bracket.num_configs[stage - 1] or not finished:
                        return None  # the previous stage is still running: this bracket waits
                    known[key] = new[key] = promote(previous.values(), size)
                promoted = known[key]
            taken = by_rung.get((index, stage), {})
            free = [slot for slot in range(size) if slot not in taken]
            if free:
                slot = free[0]
                is_promoted = slot < len(promoted)
                config = promoted[slot] if is_promoted else (index, stage, slot)
                return Assignment(index, stage, slot, config, bracket.budgets[stage], is_promoted)
        return None

    for index in opened:
        if filled[index] < quotas[index]:
            assignment = free_slot(index)
            if assignment is not None:
                return assignment, new
    following = 1 + max(opened, default=-1)
    if n_trials is None:
        return _first_slot(schedule, following), new
    left = n_trials - sum(quotas.values())
    if left > 0:
        for index in range(following, following + schedule.max_sh_iter):
            if schedule.bracket(index).evaluations <= left:
                return _first_slot(schedule, index), new
        return _first_slot(schedule, _next_full_budget_bracket(schedule, following)), new
    if any(filled[index] < quotas[index] for index in opened):
        return None, new  # the budget's slots left open only when running stages finish: wait
    # Beyond the budget: more new configurations at max_budget, never a bracket that cannot finish.
    for index in opened:
        if len(schedule.bracket(index).num_configs) == 1:
            assignment = free_slot(index)
            if assignment is not None:
                return assignment, new
    return _first_slot(schedule, _next_full_budget_bracket(schedule, following)), new


def bracket_quotas(
    schedule: HyperbandSchedule, opened: Iterable[int], n_trials: int | None
) -> dict[int, int]:
    """How many slots of each open bracket the trial budget covers, the brackets taken in order."""
    quotas: dict[int, int] = {}
    left = math.inf if n_trials is None else n_trials
    for index in sorted(opened):
        evaluations = schedule.bracket(index).evaluations
        quotas[index] = int(min(evaluations, max(left, 0)))
        left -= quotas[index]
    return quotas


def plan_for(schedule: HyperbandSchedule, n_trials: int) -> tuple[tuple[Bracket, int], ...]:
    """The brackets a study of ``n_trials`` trials runs, each with how many of its slots it fills.

    This is the plan :func:`next_assignment` follows (whatever the order in which trials finish);
    every bracket is filled entirely except, at most, a last single-stage one at ``max_budget``.
    """
    plan: list[tuple[Bracket, int]] = []
    left, following = n_trials, 0
    while left > 0:
        candidates = range(following, following + schedule.max_sh_iter)
        index = next(
            (i for i in candidates if schedule.bracket(i).evaluations <= left),
            _next_full_budget_bracket(schedule, following),
        )
        bracket = schedule.bracket(index)
        plan.append((bracket, min(bracket.evaluations, left)))
        left -= plan[-1][1]
        following = index + 1
    return tuple(plan)


def _first_slot(schedule: HyperbandSchedule, index: int) -> Assignment:
    bracket = schedule.bracket(index)
    return Assignment(index, 0, 0, (index, 0, 0), bracket.budgets[0], False)


def _next_full_budget_bracket(schedule: HyperbandSchedule, start: int) -> int:
    """The first bracket from ``start`` on that is the cycle's last: one stage, at ``max_budget``."""
    last = schedule.max_sh_iter - 1
    return start + (last - start % schedule.max_sh_iter) % schedule.max_sh_iter
