"""Optuna's own sampler conformance suites (``optuna.testing.pytest_samplers``) run over hpo's BOHB,
the way Optuna's tests run them over its samplers: a drop-in Optuna sampler passes them.

Modes: bracket mode (a planned search space, as ``sampler: {name: bohb}`` builds it) with a plan
that overlaps the suites' parameter names with other kinds of distributions (``x`` planned as a
float, the suites also suggest it as an int or a categorical), with a plan disjoint from them, and
the define-by-run mode (no planned space). Parameters outside the plan are sampled independently.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest
from conftest import ROOT
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    RelativeSamplerTestCase,
    SingleOnlySamplerTestCase,
)

from hpo.bohb import BOHBSampler
from hpo.space import parse_space

# Suggests the suites' ``x`` with another kind than they do half the time, and ``y`` as an int.
OVERLAPPING_PLAN = parse_space(
    {
        "x": {"type": "float", "low": -10, "high": 10},
        "y": {"type": "int", "low": 3, "high": 10},
        "z": {"type": "categorical", "choices": ["a", "b"]},
    },
    "test",
)
DISJOINT_PLAN = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "width": IntDistribution(8, 64, step=8),
    "act": CategoricalDistribution(["relu", "tanh"]),
}


class TestBracketModeOverlappingPlan(
    BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase
):
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: BOHBSampler(OVERLAPPING_PLAN, min_budget=1, max_budget=9, eta=3, seed=0)


class TestBracketModeDisjointPlan(BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase):
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: BOHBSampler(DISJOINT_PLAN, min_budget=1, max_budget=9, eta=3, seed=0)


class TestBracketModeWithTrialBudget(BasicSamplerTestCase, SingleOnlySamplerTestCase):
    # n_trials as hpo's study files set it (a plan fitted to the trial budget); the relative suite
    # creates trials beside the sampler's plan and is covered by the modes above.
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: BOHBSampler(OVERLAPPING_PLAN, min_budget=1, max_budget=9, eta=3, seed=0, n_trials=200)


class TestDefineByRunMode(BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase):
    @pytest.fixture
    def sampler(self) -> Callable[[], BaseSampler]:
        return lambda: BOHBSampler(seed=0)


def test_planned_parameters_still_come_from_the_plan_beside_unplanned_ones() -> None:
    """A parameter outside the plan does not take the planned ones out of BOHB's hands: they keep
    the slot's configuration (a promoted trial repeats its parent's values)."""
    sampler = BOHBSampler(DISJOINT_PLAN, min_budget=1, max_budget=9, eta=3, seed=0)
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.suggest_int("width", 8, 64, step=8)
        trial.suggest_categorical("act", ["relu", "tanh"])
        trial.suggest_float("unplanned", 0, 1)
        return lr

    study.optimize(objective, n_trials=13)  # bracket 0: 9 at budget 1, 3 at 3, 1 at 9
    by_config: dict[tuple[int, ...], list[dict[str, object]]] = {}
    for trial in study.trials:
        slot = trial.system_attrs["hpo:bohb"]
        planned = {k: v for k, v in trial.params.items() if k in DISJOINT_PLAN}
        by_config.setdefault(tuple(slot["config"]), []).append(planned)
        assert set(trial.params) == {*DISJOINT_PLAN, "unplanned"}
    promoted = [runs for runs in by_config.values() if len(runs) > 1]
    assert len(promoted) == 3  # the 3 configurations promoted to budget 3 (one of them on to 9)
    assert all(run == runs[0] for runs in promoted for run in runs)


def test_the_drop_in_example_of_docs_bohb_md_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "docs" / "bohb.md").read_text()
    section = text.split("### As a drop-in Optuna sampler", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/bohb.md", "exec"), namespace)
    study = namespace["study"]
    assert isinstance(study, optuna.Study) and len(study.trials) == 40
    budgets = {trial.system_attrs["hpo:bohb"]["budget"] for trial in study.trials}
    assert budgets == {1.0, 3.0, 9.0}  # brackets ran
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(set(t.params) == {"lr", "width", "dropout"} for t in done)
    assert "trained for" in capsys.readouterr().out
