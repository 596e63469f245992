"""BOHB's bracket plan against hpbandster's own optimizer, and the slot planner on its own."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
from ConfigSpace import ConfigurationSpace, Float
from hpbandster.core.dispatcher import Job
from hpbandster.core.master import Master
from hpbandster.optimizers import BOHB as HpBandSterBOHB
from hpo_bohb_objectives import branin

from hpo.bohb import SLOT_ATTR, BOHBSampler, HyperbandSchedule, budget_epochs, plan_for
from hpo.bohb._schedule import Assignment, SlotRun, bracket_quotas, latest_runs, next_assignment, promote
from hpo.objective import BUDGET_ATTR
from hpo.space import parse_space, suggest

# hpbandster's optimizer, built here directly, calls ConfigSpace 0.x names that 1.x deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Please use:DeprecationWarning")

SETTINGS = [
    (1, 27, 3),
    (1, 81, 3),
    (1, 9, 3),
    (1, 20, 3),
    (1, 8, 2),
    (1, 100, 3),
    (3, 81, 3),
    (1, 125, 5),
    (1, 64, 4),
    (0.01, 1, 3),
    (5, 5, 3),
    (2, 50, 2.5),
]


@pytest.fixture
def hpbandster_bohb(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A factory of hpbandster's BOHB optimizer without its Pyro4 master loop.

    ``Master.__init__`` connects to a Pyro4 name server and starts a dispatcher thread (the loop that
    hangs with ConfigSpace 1.x / NumPy 2); ``get_next_iteration`` only needs the config generator.
    """

    def init_without_loop(self: Any, run_id: str, config_generator: Any, **kwargs: Any) -> None:
        self.config_generator = config_generator
        self.config = {}

    monkeypatch.setattr(Master, "__init__", init_without_loop)

    def make(min_budget: float, max_budget: float, eta: float) -> Any:
        space = ConfigurationSpace(seed=0)
        space.add([Float("x", (-5.0, 10.0)), Float("y", (0.0, 15.0))])
        return HpBandSterBOHB(
            configspace=space, run_id="test", eta=eta, min_budget=min_budget, max_budget=max_budget
        )

    return make


@pytest.mark.parametrize(("min_budget", "max_budget", "eta"), SETTINGS)
def test_brackets_equal_hpbandsters(
    hpbandster_bohb: Any, min_budget: float, max_budget: float, eta: float
) -> None:
    reference = hpbandster_bohb(min_budget, max_budget, eta)
    schedule = HyperbandSchedule(min_budget, max_budget, eta)
    assert schedule.max_sh_iter == reference.max_SH_iter
    assert list(schedule.budgets) == list(reference.budgets)
    for index in range(2 * schedule.max_sh_iter + 1):  # two whole cycles and the start of a third
        iteration = reference.get_next_iteration(index)
        bracket = schedule.bracket(index)
        assert list(bracket.num_configs) == list(iteration.num_configs), index
        assert list(bracket.budgets) == list(iteration.budgets), index


def test_known_plan_for_1_27_3() -> None:
    # Li et al.'s Hyperband table for R=27, eta=3 (hpbandster's numbers).
    cycle = HyperbandSchedule(1, 27, 3).cycle()
    assert [b.num_configs for b in cycle] == [(27, 9, 3, 1), (9, 3, 1), (6, 2), (4,)]
    assert [b.budgets for b in cycle] == [(1, 3, 9, 27), (3, 9, 27), (9, 27), (27,)]
    assert [b.evaluations for b in cycle] == [40, 13, 8, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_budget": 0, "max_budget": 9}, "min_budget must be a positive number"),
        ({"min_budget": 10, "max_budget": 9}, "max_budget must be at least min_budget"),
        ({"min_budget": 1, "max_budget": 9, "eta": 1.5}, "eta must be at least 2"),
        ({"min_budget": 1, "max_budget": math.inf}, "max_budget must be at least"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HyperbandSchedule(**kwargs)


def test_budget_epochs_rounds_half_up_and_never_below_one() -> None:
    assert [budget_epochs(b) for b in (0.2, 1.0, 2.22, 2.5, 6.67, 20.0)] == [1, 1, 2, 3, 7, 20]


# --------------------------------------------------------------------------- the planner alone


def run(
    number: int, bracket: int, stage: int, slot: int, config: tuple[int, int, int], loss: float | None
) -> SlotRun:
    """A slot run; ``loss=None`` means still running."""
    return SlotRun(number, bracket, stage, slot, config, loss is not None, math.inf if loss is None else loss)


SCHEDULE = HyperbandSchedule(1, 9, 3)  # brackets [9, 3, 1] at (1, 3, 9), [3, 1] at (3, 9), [3] at (9,)


def test_first_trial_opens_bracket_zero() -> None:
    assignment, decided = next_assignment(SCHEDULE, [], {})
    assert (assignment.bracket, assignment.stage, assignment.slot, assignment.budget) == (0, 0, 0, 1.0)
    assert assignment.config == (0, 0, 0) and not assignment.promoted and decided == {}


def test_running_stage_makes_the_bracket_wait_and_opens_the_next() -> None:
    runs = [run(i, 0, 0, i, (0, 0, i), 1.0) for i in range(8)] + [run(8, 0, 0, 8, (0, 0, 8), None)]
    assignment, decided = next_assignment(SCHEDULE, runs, {})
    assert (assignment.bracket, assignment.stage, assignment.slot, assignment.budget) == (1, 0, 0, 3.0)
    assert decided == {}


def test_finished_stage_promotes_the_best_third_in_creation_order() -> None:
    losses = [5.0, 1.0, 7.0, 0.5, 9.0, 3.0, 8.0, 2.0, 6.0]
    runs = [run(i, 0, 0, i, (0, 0, i), loss) for i, loss in enumerate(losses)]
    assignment, decided = next_assignment(SCHEDULE, runs, {})
    assert decided == {(0, 1): ((0, 0, 1), (0, 0, 3), (0, 0, 7))}
    assert (assignment.stage, assignment.slot, assignment.config, assignment.budget) == (1, 0, (0, 0, 1), 3.0)
    assert assignment.promoted


def test_stored_decision_wins_over_results_that_arrived_later() -> None:
    # Slot 4 crashed, the decision was taken, then its retry (trial 20) came back best of all.
    losses = [5.0, 1.0, 7.0, 0.5, math.inf, 3.0, 8.0, 2.0, 6.0]
    runs = [run(i, 0, 0, i, (0, 0, i), loss) for i, loss in enumerate(losses)]
    decision = {(0, 1): ((0, 0, 1), (0, 0, 3), (0, 0, 7))}
    runs += [run(20, 0, 0, 4, (0, 0, 4), 0.01), run(21, 0, 1, 0, (0, 0, 1), None)]
    assignment, decided = next_assignment(SCHEDULE, runs, decision)
    assert decided == {} and (assignment.stage, assignment.slot, assignment.config) == (1, 1, (0, 0, 3))


def test_crashed_runs_are_not_promoted_and_their_places_get_new_configurations() -> None:
    losses = [math.inf] * 7 + [2.0, math.inf]  # one finite loss among nine
    runs = [run(i, 0, 0, i, (0, 0, i), loss) for i, loss in enumerate(losses)]
    first, decided = next_assignment(SCHEDULE, runs, {})
    assert decided == {(0, 1): ((0, 0, 7),)} and first.config == (0, 0, 7) and first.promoted
    runs.append(run(9, 0, 1, 0, (0, 0, 7), None))
    second, _ = next_assignment(SCHEDULE, runs, decided)
    # hpbandster fills the stage with a configuration sampled for it: id (bracket, stage, slot)
    assert (second.stage, second.slot, second.config, second.promoted) == (1, 1, (0, 1, 1), False)


def test_a_retried_slot_counts_once_with_its_latest_attempt() -> None:
    runs = [run(i, 0, 0, i, (0, 0, i), 1.0) for i in range(9)]
    runs[4] = SlotRun(4, 0, 0, 4, (0, 0, 4), True, math.inf)  # failed ...
    runs.append(run(30, 0, 0, 4, (0, 0, 4), None))  # ... and re-queued, running again
    assignment, _ = next_assignment(SCHEDULE, runs, {})
    assert assignment.bracket == 1  # bracket 0 waits for the retry; no tenth slot was invented


def test_promote_breaks_ties_by_age() -> None:
    rung = [run(i, 0, 0, i, (0, 0, i), 1.0) for i in range(4)]
    assert promote(rung, 2) == ((0, 0, 0), (0, 0, 1))


# --------------------------------------------------------------------------- a plan fitted to n_trials

CYCLE = sum(b.evaluations for b in SCHEDULE.cycle())  # 13 + 4 + 3 = 20


def first_stages_running() -> list[SlotRun]:
    """One cycle's first stages all taken and running: bracket 0 (9 slots), 1 (3) and 2 (3)."""
    runs = [run(i, 0, 0, i, (0, 0, i), None) for i in range(9)]
    runs += [run(9 + i, 1, 0, i, (1, 0, i), None) for i in range(3)]
    return runs + [run(12 + i, 2, 0, i, (2, 0, i), None) for i in range(3)]


def where(assignment: Assignment | None) -> tuple[int, int, int, float] | None:
    if assignment is None:
        return None
    return (assignment.bracket, assignment.stage, assignment.slot, assignment.budget)


def test_a_trial_waits_while_running_brackets_hold_the_trials_left() -> None:
    runs = first_stages_running()
    assert where(next_assignment(SCHEDULE, runs, {})[0]) == (3, 0, 0, 1.0)  # hpbandster's endless plan
    # 20 trials: the 5 left are the later stages of brackets 0 and 1, which wait for stage 0
    assert next_assignment(SCHEDULE, runs, {}, n_trials=CYCLE) == (None, {})
    assert where(next_assignment(SCHEDULE, runs, {}, n_trials=CYCLE + 13)[0]) == (3, 0, 0, 1.0)


def test_a_retry_refills_its_slot_and_takes_no_trial_from_the_budget() -> None:
    runs = first_stages_running()
    runs[4] = run(4, 0, 0, 4, (0, 0, 4), math.inf)  # crashed ...
    runs.append(run(30, 0, 0, 4, (0, 0, 4), None))  # ... and re-queued
    assert next_assignment(SCHEDULE, runs, {}, n_trials=CYCLE) == (None, {})


def test_a_smaller_bracket_of_the_cycle_opens_when_the_next_does_not_fit() -> None:
    runs = first_stages_running()
    # 12 left: bracket 3 (13 evaluations) does not fit, bracket 4 ([3, 1] at 3, 9) does
    assert where(next_assignment(SCHEDULE, runs, {}, n_trials=CYCLE + 12)[0]) == (4, 0, 0, 3.0)
    # 3 left: bracket 5, the cycle's last ([3] at 9)
    assert where(next_assignment(SCHEDULE, runs, {}, n_trials=CYCLE + 3)[0]) == (5, 0, 0, 9.0)


def test_leftover_trials_get_the_full_budget_and_no_more_than_their_share() -> None:
    runs = first_stages_running()
    # 2 left, fewer than any bracket: new configurations at max_budget, in bracket 5 ([3] at 9)
    assert where(next_assignment(SCHEDULE, runs, {}, n_trials=CYCLE + 2)[0]) == (5, 0, 0, 9.0)
    runs += [run(15, 5, 0, 0, (5, 0, 0), None), run(16, 5, 0, 1, (5, 0, 1), None)]
    # bracket 5's third slot is beyond the budget: the 5 trials left belong to brackets 0 and 1
    assert next_assignment(SCHEDULE, runs, {}, n_trials=CYCLE + 2) == (None, {})
    assert bracket_quotas(SCHEDULE, [0, 1, 2, 5], CYCLE + 2) == {0: 13, 1: 4, 2: 3, 5: 2}


def test_a_trial_beyond_the_budget_gets_a_full_budget_configuration() -> None:
    schedule = HyperbandSchedule(1, 9, 3)
    runs: list[SlotRun] = []
    decisions: dict[Any, Any] = {}
    for number in range(CYCLE + 2):  # one at a time, each finished before the next: the whole plan
        assignment, decided = next_assignment(schedule, runs, decisions, n_trials=CYCLE + 2)
        assert assignment is not None
        decisions.update(decided)
        runs.append(
            run(number, assignment.bracket, assignment.stage, assignment.slot, assignment.config, 1.0)
        )
    assert where(next_assignment(schedule, runs, decisions, n_trials=CYCLE + 2)[0]) == (5, 0, 2, 9.0)
    runs.append(run(99, 5, 0, 2, (5, 0, 2), 1.0))
    assert where(next_assignment(schedule, runs, decisions, n_trials=CYCLE + 2)[0]) == (8, 0, 0, 9.0)


def test_the_plan_of_the_issue_a_whole_cycle_of_1_to_27_epochs() -> None:
    schedule = HyperbandSchedule(1, 27, 3)
    plan = plan_for(schedule, 65)
    assert [(bracket.index, filled) for bracket, filled in plan] == [(0, 40), (1, 13), (2, 8), (3, 4)]
    assert sum(bracket.total_budget for bracket, _ in plan) == 405
    assert sum(bracket.num_configs[-1] for bracket, _ in plan) == 8  # evaluations at 27 epochs
    assert [(b.index, n) for b, n in plan_for(SCHEDULE, 26)] == [(0, 13), (1, 4), (2, 3), (4, 4), (5, 2)]


def test_a_slot_handed_on_to_an_older_trial_is_its_current_attempt() -> None:
    failed = run(9, 0, 0, 4, (0, 0, 4), math.inf)
    adopter = SlotRun(2, 0, 0, 4, (0, 0, 4), False, math.inf, attempt=1)
    assert latest_runs([failed, adopter])[(0, 0, 4)] is adopter


def simulate(schedule: HyperbandSchedule, n_trials: int, workers: int, seed: int) -> list[SlotRun]:
    """``workers`` parallel workers, each claiming one of the ``n_trials`` trials and asking for its
    slot again and again while it has to wait; run lengths proportional to the budget, some crash."""
    rng = random.Random(seed)
    runs: dict[int, SlotRun] = {}
    decisions: dict[Any, Any] = {}
    ends: dict[int, float] = {}  # running trial -> when it finishes
    waiting: list[int] = []
    claimed = 0
    now = 0.0
    while claimed < n_trials or ends or waiting:
        while len(ends) + len(waiting) < workers and claimed < n_trials:
            waiting.append(claimed)
            claimed += 1
        for number in list(waiting):
            assignment, decided = next_assignment(schedule, runs.values(), decisions, n_trials)
            decisions.update(decided)
            if assignment is not None:
                a = assignment
                runs[number] = SlotRun(number, a.bracket, a.stage, a.slot, a.config, False, math.inf)
                ends[number] = now + a.budget * rng.uniform(0.5, 1.5)
                waiting.remove(number)
        assert ends, f"deadlock: trials {waiting} wait and nothing runs"
        number = min(ends, key=ends.__getitem__)
        now = ends.pop(number)
        loss = math.inf if rng.random() < 0.1 else rng.random()
        old = runs[number]
        runs[number] = SlotRun(number, old.bracket, old.stage, old.slot, old.config, True, loss)
    return list(runs.values())


@pytest.mark.parametrize(("min_budget", "max_budget", "eta"), [(1, 27, 3), (1, 9, 3), (1, 8, 2), (3, 81, 3)])
@pytest.mark.parametrize("workers", [2, 8, 40])
def test_parallel_workers_fill_exactly_the_plan_whatever_the_order(
    min_budget: float, max_budget: float, eta: float, workers: int
) -> None:
    schedule = HyperbandSchedule(min_budget, max_budget, eta)
    cycle = sum(b.evaluations for b in schedule.cycle())
    for n_trials in (cycle, 2 * cycle, schedule.bracket(0).evaluations, cycle + 1, 2 * cycle + 7):
        plan = plan_for(schedule, n_trials)
        for seed in range(2):
            runs = simulate(schedule, n_trials, workers, seed)
            filled: dict[int, list[int]] = {}
            for bracket, stage, _ in latest_runs(runs):
                filled.setdefault(bracket, [0] * len(schedule.bracket(bracket).num_configs))[stage] += 1
            expected = {b.index: list(b.num_configs) if n == b.evaluations else [n] for b, n in plan}
            assert filled == expected, (n_trials, workers, seed)
            if n_trials % cycle == 0:  # whole cycles: every bracket complete, the plan's budget used
                assert all(n == b.evaluations for b, n in plan)
                budgets = [schedule.bracket(b).budgets[stage] for b, stage, _ in latest_runs(runs)]
                assert sum(budgets) == pytest.approx(
                    n_trials // cycle * sum(b.total_budget for b in schedule.cycle())
                )
                assert budgets.count(schedule.max_budget) == sum(b.num_configs[-1] for b, _ in plan)


# --------------------------------------------------------------------------- job for job


class _Replay:
    """hpbandster config generator that hands out given configurations in order."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        self._configs: Iterator[dict[str, Any]] = iter(configs)

    def get_config(self, budget: float) -> tuple[dict[str, Any], dict[str, Any]]:
        return next(self._configs), {}


def _loss(config: dict[str, Any], budget: float, max_budget: float) -> float | None:
    if config["x"] < -3.5:
        return None  # crashes, to exercise hpbandster's crash handling too
    return branin(config["x"], config["y"], budget / max_budget)


@pytest.mark.parametrize(("min_budget", "max_budget", "eta", "n_trials"), [(1, 9, 3, 60), (1, 8, 2, 70)])
def test_sequential_run_is_hpbandsters_job_for_job(
    hpbandster_bohb: Any, min_budget: float, max_budget: float, eta: float, n_trials: int
) -> None:
    """Same configurations in: the same jobs, budgets and promotions out, in the same order."""
    space = parse_space(
        {"x": {"type": "float", "low": -5, "high": 10}, "y": {"type": "float", "low": 0, "high": 15}}, "t"
    )
    sampler = BOHBSampler(space, min_budget=min_budget, max_budget=max_budget, eta=eta, seed=3)
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        budget = float(trial.storage.get_trial_system_attrs(trial._trial_id)[SLOT_ATTR]["budget"])
        loss = _loss(params, budget, max_budget)
        if loss is None:
            raise RuntimeError("simulated crash")
        return loss

    study.optimize(objective, n_trials=n_trials, catch=(RuntimeError,))
    trials = study.get_trials()
    slots = [t.system_attrs[SLOT_ATTR] for t in trials]
    assert all(
        t.system_attrs[BUDGET_ATTR] == budget_epochs(s["budget"]) for t, s in zip(trials, slots, strict=True)
    )
    fresh = [t.params for t, s in zip(trials, slots, strict=True) if not s["promoted"]]

    reference = hpbandster_bohb(min_budget, max_budget, eta)
    reference.config_generator = _Replay(fresh)
    iterations: list[Any] = []
    jobs: list[tuple[Any, ...]] = []
    while len(jobs) < n_trials:  # hpbandster's Master.run loop with one worker, minus Pyro4
        next_run = None
        for iteration in iterations:
            if not iteration.is_finished:
                next_run = iteration.get_next_run()
                if next_run is not None:
                    break
        if next_run is None:
            iterations.append(reference.get_next_iteration(len(iterations)))
            continue
        config_id, config, budget = next_run
        job = Job(config_id, config=config, budget=budget)
        loss = _loss(config, budget, max_budget)
        job.result = None if loss is None else {"loss": loss}
        iterations[config_id[0]].register_result(job)
        jobs.append((config_id, config, budget))

    assert any(t.state == optuna.trial.TrialState.FAIL for t in trials), "the crash path was not exercised"
    for trial, slot, (config_id, config, budget) in zip(trials, slots, jobs, strict=True):
        assert tuple(slot["config"]) == config_id, trial.number
        assert slot["budget"] == budget, trial.number
        assert trial.params == config, trial.number
