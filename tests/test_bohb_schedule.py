"""BOHB's bracket plan against hpbandster's own optimizer, and the slot planner on its own."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
from ConfigSpace import ConfigurationSpace, Float
from hpbandster.core.dispatcher import Job
from hpbandster.core.master import Master
from hpbandster.optimizers import BOHB as HpBandSterBOHB
from hpo_bohb_objectives import branin

from hpo.bohb import SLOT_ATTR, BOHBSampler, HyperbandSchedule, budget_epochs
from hpo.bohb._schedule import SlotRun, next_assignment, promote
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
