"""The BOHB sampler in-process: Optuna's conformance suite, the model's behaviour, the study-file
builder, retries and reproducibility."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
import pytest
from conftest import run_cli, write_study
from hpo_bohb_objectives import bowl, branin
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    RelativeSamplerTestCase,
    SingleOnlySamplerTestCase,
)
from optuna.trial import TrialState

from hpo.bohb import (
    ADOPTED_BY_ATTR,
    MODEL_PICK_ATTR,
    SLOT_ATTR,
    BOHBSampler,
    HyperbandSchedule,
    SlotWaitError,
    trial_budget,
)
from hpo.bohb._configspace import ConfigSpaceCodec
from hpo.bohb._kde import KdeModel, KdeOptions, Observation
from hpo.errors import SpecError
from hpo.objective import BUDGET_ATTR
from hpo.samplers import SAMPLER_BUILDERS, make_sampler
from hpo.space import parse_space, suggest
from hpo.spec import parse_study

BRANIN_SPACE = parse_space(
    {"x": {"type": "float", "low": -5, "high": 10}, "y": {"type": "float", "low": 0, "high": 15}}, "branin"
)


class TestOptunaConformance(BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase):
    """Optuna's own sampler test suite, for BOHB used as a plain define-by-run sampler."""

    @pytest.fixture(params=["hpbandster defaults", "always the model"])
    def sampler(self, request: pytest.FixtureRequest) -> Any:
        if request.param == "always the model":
            return lambda: BOHBSampler(seed=1, random_fraction=0.0, num_samples=8)
        return lambda: BOHBSampler(seed=0)


def xy(params: Mapping[str, Any]) -> tuple[float, float]:
    return float(params["x"]), float(params["y"])


def run_branin(
    sampler: BOHBSampler, n_trials: int, direction: Literal["minimize", "maximize"] = "minimize"
) -> optuna.Study:
    study = optuna.create_study(sampler=sampler, direction=direction)
    assert sampler.schedule is not None
    max_budget = sampler.schedule.max_budget

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, BRANIN_SPACE)
        budget = trial_budget(trial)
        assert budget is not None
        value = branin(*xy(params), budget / max_budget)
        return value if direction == "minimize" else -value

    study.optimize(objective, n_trials=n_trials)
    return study


BOWL_SPACE = parse_space(
    {"x": {"type": "float", "low": -5, "high": 5}, "y": {"type": "float", "low": -5, "high": 5}}, "bowl"
)


def test_model_suggestions_concentrate_near_the_optimum() -> None:
    """New configurations the KDE picks land near the bowl's minimum; the prior's draws do not."""
    by_model: list[float] = []
    at_random: list[float] = []
    for seed in range(3):
        sampler = BOHBSampler(BOWL_SPACE, min_budget=1, max_budget=9, eta=3, seed=seed)
        study = optuna.create_study(sampler=sampler)

        def objective(trial: optuna.Trial) -> float:
            params = suggest(trial, BOWL_SPACE)
            return bowl(*xy(params), (trial_budget(trial) or 9) / 9)

        study.optimize(objective, n_trials=70)
        new = [t for t in study.trials if not t.system_attrs[SLOT_ATTR]["promoted"]]
        distance = {t.number: math.hypot(t.params["x"] - 2, t.params["y"] + 1) for t in new}
        picked = [t for t in new if t.system_attrs[MODEL_PICK_ATTR]]
        assert len(picked) >= 25  # a third are random by design (random_fraction), the rest the model's
        by_model += [distance[t.number] for t in picked[-15:]]
        at_random += [distance[t.number] for t in new if not t.system_attrs[MODEL_PICK_ATTR]]
    assert statistics.median(by_model) < 0.4 * statistics.median(at_random), (by_model, at_random)
    near = 1.5
    share_model = sum(d < near for d in by_model) / len(by_model)
    share_random = sum(d < near for d in at_random) / len(at_random)
    assert share_model > 3 * share_random, (share_model, share_random)


def test_every_trial_gets_the_slot_budget_in_whole_epochs() -> None:
    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=20, eta=3, seed=0)
    study = run_branin(sampler, 25)
    plan = HyperbandSchedule(1, 20, 3).budgets
    assert [round(b, 3) for b in plan] == [2.222, 6.667, 20.0]  # 20 * 3**-k, as hpbandster computes them
    assert {t.system_attrs[SLOT_ATTR]["budget"] for t in study.trials} == set(plan)
    epochs = dict(zip(plan, (2, 7, 20), strict=True))
    for trial in study.trials:
        assert trial.system_attrs[BUDGET_ATTR] == epochs[trial.system_attrs[SLOT_ATTR]["budget"]]


def test_promoted_configurations_keep_their_parameters_and_are_the_best() -> None:
    for direction in ("minimize", "maximize"):
        study = run_branin(BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=2), 13, direction)
        slots = {t.number: t.system_attrs[SLOT_ATTR] for t in study.trials}
        params_of = {
            tuple(s["config"]): study.trials[n].params for n, s in slots.items() if not s["promoted"]
        }
        stage0 = [t for t in study.trials if slots[t.number]["stage"] == 0]
        stage1 = [t for t in study.trials if slots[t.number]["stage"] == 1]
        assert len(stage0) == 9 and len(stage1) == 3
        best3 = sorted(stage0, key=lambda t: t.values[0], reverse=direction == "maximize")[:3]
        assert {tuple(slots[t.number]["config"]) for t in stage1} == {
            tuple(slots[t.number]["config"]) for t in best3
        }
        for trial in stage1:
            assert trial.params == params_of[tuple(slots[trial.number]["config"])]


CONDITIONAL_SPACE = parse_space(
    {
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "lr": {"type": "float", "low": 1.0e-4, "high": 1.0, "log": True},
        "momentum": {"type": "float", "low": 0.0, "high": 0.99, "when": {"optimizer": ["sgd"]}},
        "layers": {"type": "int", "low": 1, "high": 3},
        "width": {"type": "int", "low": 16, "high": 128, "step": 16, "when": {"layers": [2, 3]}},
    },
    "conditional",
)


def test_conditional_spaces_go_through_the_model() -> None:
    """KDE proposals on a tree-shaped space hold exactly the active parameters, and find the good branch."""
    sampler = BOHBSampler(CONDITIONAL_SPACE, min_budget=1, max_budget=9, seed=0)
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        p: dict[str, Any] = suggest(trial, CONDITIONAL_SPACE)
        loss = (math.log10(float(p["lr"])) + 2) ** 2 + (0.0 if p["optimizer"] == "sgd" else 1.0)
        loss += (float(p.get("momentum", 0.0)) - 0.9) ** 2 + 0.1 * abs(int(p.get("width", 64)) - 64) / 16
        return loss * (1 + 1 / (trial_budget(trial) or 9))

    study.optimize(objective, n_trials=90)
    for trial in study.trials:
        CONDITIONAL_SPACE.validate_config(trial.params)  # exactly the active parameters, in range
    new = [t for t in study.trials if not t.system_attrs[SLOT_ATTR]["promoted"]]
    picked = [t for t in new if t.system_attrs[MODEL_PICK_ATTR]]
    drawn = [t for t in new if not t.system_attrs[MODEL_PICK_ATTR]]
    assert len(picked) >= 20 and {t.params["optimizer"] for t in picked} <= {"adam", "sgd"}
    sgd_share = sum(t.params["optimizer"] == "sgd" for t in picked[-15:]) / 15
    assert sgd_share > 0.8 > sum(t.params["optimizer"] == "sgd" for t in drawn) / len(drawn)
    assert any("width" in t.params for t in picked) and any("momentum" in t.params for t in picked)


def test_same_seed_same_run_and_the_global_numpy_state_is_left_alone() -> None:
    def run(seed: int) -> list[tuple[Any, ...]]:
        study = run_branin(BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=seed), 30)
        return [(t.params["x"], t.params["y"], t.system_attrs[SLOT_ATTR]["budget"]) for t in study.trials]

    np.random.seed(1234)
    expected_next = np.random.rand()
    np.random.seed(1234)
    first = run(5)
    assert np.random.rand() == expected_next  # hpbandster drew from a seeded, then restored, state
    assert run(5) == first
    assert run(6) != first


def test_model_is_a_function_of_the_observations_only() -> None:
    """A model fed one observation at a time proposes what a model fed everything at once does."""
    codec = ConfigSpaceCodec(BRANIN_SPACE)
    rng = np.random.default_rng(0)
    observations = []
    for number in range(40):
        x, y = float(rng.uniform(-5, 10)), float(rng.uniform(0, 15))
        budget = (1.0, 3.0)[number % 2]
        observations.append(Observation(number, (("x", x), ("y", y)), budget, branin(x, y, budget / 3)))
    incremental = KdeModel(codec, KdeOptions())
    for end in range(1, 41):
        incremental.feed(observations[:end])
    at_once = KdeModel(ConfigSpaceCodec(BRANIN_SPACE), KdeOptions())
    at_once.feed(observations)
    assert incremental.model_budgets == at_once.model_budgets == (1.0, 3.0)
    for seed in range(5):
        assert incremental.propose(3.0, seed) == at_once.propose(3.0, seed)
    with pytest.raises(ValueError, match="extend"):
        at_once.feed(observations[::-1])


def test_random_picks_cover_the_whole_prior() -> None:
    """The share of random configurations (random_fraction) is drawn independently of their values."""
    codec = ConfigSpaceCodec(BRANIN_SPACE)
    model = KdeModel(codec, KdeOptions())
    rng = np.random.default_rng(1)
    observations = []
    for number in range(20):
        x, y = float(rng.uniform(-5, 10)), float(rng.uniform(0, 15))
        observations.append(Observation(number, (("x", x), ("y", y)), 9.0, branin(x, y)))
    model.feed(observations)
    random_x = [
        values["x"] for values, by_model in (model.propose(9.0, seed) for seed in range(300)) if not by_model
    ]
    assert 70 < len(random_x) < 130  # about a third of 300
    lowest_third = sum(x < 0 for x in random_x) / len(random_x)  # x in [-5, 10]: below 0 is a third
    assert 0.2 < lowest_third < 0.47, lowest_third


def test_a_retried_trial_keeps_its_slot_and_parameters() -> None:
    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=0)
    study = optuna.create_study(sampler=sampler)
    for _ in range(3):
        trial = study.ask()
        params = suggest(trial, BRANIN_SPACE)
        study.tell(trial, branin(*xy(params)))
    trial = study.ask()
    suggest(trial, BRANIN_SPACE)
    failed = study.tell(trial, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, failed)  # what a worker does for an interrupted trial
    retry = study.ask()  # takes the re-queued trial
    assert suggest(retry, BRANIN_SPACE) == failed.params
    retried = study._storage.get_trial(retry._trial_id)
    assert (
        retried.system_attrs[SLOT_ATTR]
        == failed.system_attrs[SLOT_ATTR]
        == {
            "bracket": 0,
            "stage": 0,
            "slot": 3,
            "config": [0, 0, 3],
            "budget": 1.0,
            "promoted": False,
        }
    )
    following = study.ask()
    assert study._storage.get_trial(following._trial_id).system_attrs[SLOT_ATTR]["slot"] == 4


def test_multi_objective_studies_are_refused() -> None:
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9)
    )
    with pytest.raises(ValueError, match="multi-objective"):
        study.ask()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_budget": 1}, "needs min_budget and max_budget"),
        ({"min_budget": 1, "max_budget": 9, "top_n_percent": 100}, "top_n_percent"),
        ({"min_budget": 1, "max_budget": 9, "random_fraction": 1.5}, "random_fraction"),
        ({"min_budget": 1, "max_budget": 9, "num_samples": 0}, "num_samples"),
        ({"min_budget": 1, "max_budget": 9, "bandwidth_factor": -1}, "bandwidth_factor"),
        ({"min_budget": "1", "max_budget": 9}, "min_budget must be a number"),
    ],
)
def test_constructor_rejects_bad_options(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BOHBSampler(BRANIN_SPACE, **kwargs)


def test_budgets_without_a_search_space_are_refused() -> None:
    with pytest.raises(ValueError, match="need a search_space"):
        BOHBSampler(max_budget=9)


# --------------------------------------------------------------------------- study files

STUDY = """
name: bohb_file
objective: hpo_bohb_objectives:branin_epochs
search_space:
  x: {{type: float, low: -5, high: 10}}
  y: {{type: float, low: 0, high: 15}}
metric: loss
direction: minimize
n_trials: {n_trials}
budget: {{max_epochs: 27, min_epochs: 3}}
sampler: {sampler}
"""


def spec_with(sampler: str, n_trials: int = 20) -> Any:
    import yaml

    return parse_study(yaml.safe_load(STUDY.format(sampler=sampler, n_trials=n_trials)), "study.yaml")


def test_study_file_defaults_budgets_to_the_epoch_budget() -> None:
    assert "bohb" in SAMPLER_BUILDERS
    sampler = make_sampler(spec_with("{name: bohb}"))
    assert isinstance(sampler, BOHBSampler) and sampler.schedule == HyperbandSchedule(3, 27, 3)
    sampler = make_sampler(spec_with("{name: bohb, options: {min_budget: 1, max_budget: 9, eta: 2}}"))
    assert isinstance(sampler, BOHBSampler) and sampler.schedule == HyperbandSchedule(1, 9, 2)


@pytest.mark.parametrize(
    ("sampler", "message"),
    [
        ("{name: bohb, options: {etta: 3}}", "unknown BOHB option(s) etta"),
        ("{name: bohb, options: {max_budget: 30}}", "max_budget=30 exceeds budget.max_epochs=27"),
        ("{name: bohb, options: {min_budget: 0.5}}", "min_budget is in epochs and must be at least 1"),
        ("{name: bohb, options: {eta: 1}}", "eta must be at least 2"),
        ("{name: bohb, options: {top_n_percent: 0}}", "top_n_percent must be an integer from 1 to 99"),
    ],
)
def test_bad_options_are_one_clear_error_at_load_time(sampler: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec_with(sampler)
    assert caught.value.field == "sampler.options"
    assert message in str(caught.value)


def test_fewer_trials_than_the_first_bracket_is_refused() -> None:
    spec_with("{name: bohb}", n_trials=13)  # budgets 3, 9, 27: the first bracket is 9 + 3 + 1
    with pytest.raises(
        SpecError, match=r"n_trials=12 is less than the 13 evaluations .*9 at 3 \+ 3 at 9 \+ 1 at 27"
    ):
        spec_with("{name: bohb}", n_trials=12)


def test_cli_reports_a_bad_option_in_one_line(tmp_path: Path) -> None:
    path = write_study(tmp_path, STUDY.format(sampler="{name: bohb, options: {max_budget: 30}}", n_trials=20))
    result = run_cli(["create-study", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "max_budget=30 exceeds" in lines[0], (
        result.stderr
    )


# --------------------------------------------------------------------------- a plan fitted to n_trials


def test_a_stale_trial_object_never_gets_a_second_slot() -> None:
    """before_trial reads the slot from the storage under the plan lock, not from the trial it is given."""
    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=0, n_trials=20)
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    stale = study._storage.get_trial(trial._trial_id)
    stale.system_attrs.pop(SLOT_ATTR)  # as read before the first before_trial wrote the slot
    sampler.before_trial(study, stale)  # the same trial handed in again (claimed twice)
    slot = study._storage.get_trial_system_attrs(trial._trial_id)[SLOT_ATTR]
    assert (slot["bracket"], slot["stage"], slot["slot"]) == (0, 0, 0)
    following = study.ask()
    assert study._storage.get_trial_system_attrs(following._trial_id)[SLOT_ATTR]["slot"] == 1


def test_parallel_threads_fill_exactly_the_plan_of_n_trials() -> None:
    """Eight threads, one cycle of trials: later trials wait for rungs instead of opening brackets."""
    schedule = HyperbandSchedule(1, 9, 3)
    cycle = schedule.cycle()
    n_trials = sum(b.evaluations for b in cycle)
    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=0, n_trials=n_trials)
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, BRANIN_SPACE)
        budget = trial_budget(trial)
        assert budget is not None
        time.sleep(0.01 * budget)
        return branin(*xy(params), budget / 9)

    study.optimize(objective, n_trials=n_trials, n_jobs=8)
    slots = [t.system_attrs[SLOT_ATTR] for t in study.trials]
    assert len({(s["bracket"], s["stage"], s["slot"]) for s in slots}) == n_trials
    filled = Counter((s["bracket"], s["stage"]) for s in slots)
    assert filled == {(b.index, stage): n for b in cycle for stage, n in enumerate(b.num_configs)}
    assert sum(s["budget"] for s in slots) == sum(b.total_budget for b in cycle)


def test_leftover_trials_evaluate_new_configurations_at_the_full_budget() -> None:
    # 1..9, eta 3: a cycle is 13 + 4 + 3 = 20 trials; 26 leaves 6: bracket 3 (13) does not fit,
    # bracket 4 (4) does, and the last 2 go to a single-stage bracket at max_budget.
    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=0, n_trials=26)
    study = run_branin(sampler, 26)
    slots = [t.system_attrs[SLOT_ATTR] for t in study.trials]
    assert Counter(s["bracket"] for s in slots) == {0: 13, 1: 4, 2: 3, 4: 4, 5: 2}
    assert {s["budget"] for s in slots if s["bracket"] == 5} == {9.0}
    assert not any(s["promoted"] for s in slots if s["bracket"] == 5)
    # a trial beyond n_trials also gets a new configuration at max_budget, it never waits for ever
    extra = study.ask()
    slot = study._storage.get_trial_system_attrs(extra._trial_id)[SLOT_ATTR]
    assert (slot["bracket"], slot["stage"], slot["slot"], slot["budget"]) == (5, 0, 2, 9.0)


def stage_zero_with_a_requeued_trial(
    sampler: BOHBSampler,
) -> tuple[optuna.Study, int, optuna.trial.FrozenTrial]:
    """Bracket 0's first stage (nine trials): eight finished, the ninth failed and re-queued. Also
    a trial claimed before all of them (number 0) that has not asked for its slot yet."""
    study = optuna.create_study(sampler=sampler)
    early = study._storage.create_new_trial(study._study_id)  # RUNNING, like a claimed queued trial
    asked = [study.ask() for _ in range(9)]
    for trial in asked[:8]:
        study.tell(trial, branin(*xy(suggest(trial, BRANIN_SPACE))))
    suggest(asked[8], BRANIN_SPACE)
    failed = study.tell(asked[8], state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, failed)  # what a worker does for an interrupted trial
    return study, early, failed


def test_a_waiting_trial_takes_over_a_requeued_slot() -> None:
    """With every slot of the budget taken, a trial would wait for the rung, which waits for a
    re-queued trial that no free worker may be left to claim: the waiting trial runs it instead."""
    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=0, n_trials=13, wait_timeout=5)
    study, early, failed = stage_zero_with_a_requeued_trial(sampler)
    storage = study._storage
    (retry,) = storage.get_all_trials(study._study_id, states=(TrialState.WAITING,))
    started = time.monotonic()
    trial = optuna.Trial(study, early)  # before_trial
    assert time.monotonic() - started < 2
    attrs = storage.get_trial_system_attrs(early)
    assert attrs[SLOT_ATTR] == {**failed.system_attrs[SLOT_ATTR], "attempt": 1}
    assert attrs["failed_trial"] == failed.number
    assert suggest(trial, BRANIN_SPACE) == failed.params
    adopted = storage.get_trial(retry._trial_id)
    assert adopted.state == TrialState.FAIL and adopted.system_attrs[ADOPTED_BY_ATTR] == trial.number == 0
    assert adopted.system_attrs[SLOT_ATTR] is None and "taken over" in adopted.system_attrs["fail_reason"]
    (replacement,) = storage.get_all_trials(study._study_id, states=(TrialState.WAITING,))
    assert SLOT_ATTR not in replacement.system_attrs  # a fresh trial keeps the study at n_trials slots
    study.tell(trial, -1.0)  # the best of the stage: its result, not the failed attempt's, counts
    following = study.ask()
    assert following._trial_id == replacement._trial_id
    slot = storage.get_trial_system_attrs(following._trial_id)[SLOT_ATTR]
    assert (slot["bracket"], slot["stage"], slot["slot"], slot["promoted"]) == (0, 1, 0, True)
    assert [0, 0, 8] in storage.get_study_system_attrs(study._study_id)["hpo:bohb:promoted:0:1"]


def test_a_trial_waits_for_a_running_stage_and_times_out_clearly() -> None:
    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=0, n_trials=13, wait_timeout=0.3)
    study = optuna.create_study(sampler=sampler)
    asked = [study.ask() for _ in range(9)]
    for trial in asked[:8]:
        study.tell(trial, branin(*xy(suggest(trial, BRANIN_SPACE))))
    started = time.monotonic()
    with pytest.raises(SlotWaitError, match=r"trial 9 waited .* n_trials=13 .*wait_timeout"):
        study.ask()  # trial 8 still runs: stage 1 cannot start, and 13 trials allow no bracket 1
    assert 0.3 <= time.monotonic() - started < 3


def test_a_wait_check_can_end_the_wait() -> None:
    """hpo's worker can stop on SIGTERM while it waits; a caller that must not block can refuse to."""

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=0, n_trials=13)
    study = optuna.create_study(sampler=sampler)
    asked = [study.ask() for _ in range(9)]  # all running: stage 1 has to wait for them
    sampler.wait_check = stop
    with pytest.raises(Stop):
        study.ask()
    assert len(asked) == 9


def test_a_waiting_trial_gets_its_slot_once_the_stage_finishes() -> None:
    sampler = BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, seed=0, n_trials=13, wait_timeout=30)
    study = optuna.create_study(sampler=sampler)
    asked = [study.ask() for _ in range(9)]
    for trial in asked:
        suggest(trial, BRANIN_SPACE)
    for trial in asked[:8]:
        study.tell(trial, 1.0 + trial.number)
    timer = threading.Timer(0.5, lambda: study.tell(asked[8], 0.5))
    timer.start()
    started = time.monotonic()
    waited = study.ask()
    assert time.monotonic() - started >= 0.4
    timer.join()
    slot = study._storage.get_trial_system_attrs(waited._trial_id)[SLOT_ATTR]
    assert (slot["bracket"], slot["stage"], slot["slot"], slot["config"]) == (0, 1, 0, [0, 0, 0])


def test_study_files_give_bohb_their_trial_budget() -> None:
    sampler = make_sampler(spec_with("{name: bohb, options: {wait_timeout: 60}}", n_trials=26))
    assert isinstance(sampler, BOHBSampler) and sampler.n_trials == 26
    with pytest.raises(SpecError, match="wait_timeout must be a positive number"):
        spec_with("{name: bohb, options: {wait_timeout: 0}}")
    with pytest.raises(ValueError, match="n_trials must be a positive whole number"):
        BOHBSampler(BRANIN_SPACE, min_budget=1, max_budget=9, n_trials=0)
