"""The canonical search space: parsing, conditions, grids and the Optuna converter round trip."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hpo.errors import SpecError
from hpo.space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    from_optuna_distributions,
    grid_points,
    parse_space,
    space_to_dict,
    suggest,
    to_optuna_distributions,
)

REPORT_002 = {
    "lr": {
        "type": "float",
        "low": 1.0e-6,
        "high": 1.0e-2,
        "log": True,
        "grid": [1.0e-6, 1.0e-5, 1.0e-4, 1.0e-3, 1.0e-2],
    },
    "batch_size": {"type": "int", "low": 4, "high": 16, "grid": [4, 8, 12, 16]},
}

CONDITIONAL = {
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "momentum": {
        "type": "float",
        "low": 0.0,
        "high": 0.99,
        "when": {"optimizer": ["sgd"]},
        "grid": [0.0, 0.9],
    },
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "grid": [1e-3, 1e-2]},
}


def test_parse_types_and_fields() -> None:
    space = parse_space(REPORT_002, "s.yaml")
    lr, batch = space.params
    assert (
        isinstance(lr, FloatParam) and lr.log and lr.low == 1e-6 and lr.grid == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    )
    assert isinstance(batch, IntParam) and batch.low == 4 and batch.high == 16 and batch.step == 1
    assert space.names == ("lr", "batch_size")
    assert not space.is_conditional


def test_round_trip_through_dict_keeps_everything() -> None:
    space = parse_space(CONDITIONAL, "s.yaml")
    assert parse_space(space_to_dict(space), "again") == space


@pytest.mark.parametrize(
    "raw",
    [
        {"a": {"type": "int", "low": 1, "high": 1024, "log": True}},
        {"a": {"type": "int", "low": 0, "high": 10, "step": 2}},
        {"a": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
        {"a": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25}},
        {"a": {"type": "categorical", "choices": [1, "x", None, True]}},
    ],
)
def test_optuna_round_trip_keeps_integer_bounds_steps_and_log(raw: dict) -> None:
    space = parse_space(raw, "s.yaml")
    distributions = to_optuna_distributions(space)
    assert from_optuna_distributions(distributions) == space
    dist = distributions["a"]
    param = space["a"]
    if isinstance(param, IntParam):
        assert isinstance(dist, IntDistribution)
        assert (dist.low, dist.high, dist.step, dist.log) == (param.low, param.high, param.step, param.log)
    elif isinstance(param, FloatParam):
        assert isinstance(dist, FloatDistribution) and dist.log == param.log and dist.step == param.step
    else:
        assert isinstance(dist, CategoricalDistribution) and tuple(dist.choices) == param.choices


def test_sampled_values_respect_bounds_log_and_step() -> None:
    space = parse_space(
        {
            "n": {"type": "int", "low": 4, "high": 16, "step": 4},
            "lr": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        },
        "s.yaml",
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lrs = []
    for _ in range(200):
        trial = study.ask()
        values = suggest(trial, space)
        assert values["n"] in (4, 8, 12, 16)
        assert 1e-6 <= values["lr"] <= 1e-2
        lrs.append(math.log10(values["lr"]))
        study.tell(trial, 0.0)
    # log-uniform: about as many samples below 1e-4 (the log midpoint) as above it
    below = sum(1 for v in lrs if v < -4)
    assert 60 < below < 140


def test_conditional_parameters_are_only_suggested_when_active() -> None:
    space = parse_space(CONDITIONAL, "s.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        values = suggest(trial, space)
        seen.add(values["optimizer"])
        assert ("momentum" in values) == (values["optimizer"] == "sgd")
        space.validate_config(values)
        study.tell(trial, 1.0)
    assert seen == {"adam", "sgd"}


def test_grid_expands_conditionals_only_where_active() -> None:
    points = grid_points(parse_space(CONDITIONAL, "s.yaml"))
    # adam x 2 lr + sgd x 2 momentum x 2 lr
    assert len(points) == 2 + 4
    assert all(("momentum" in p) == (p["optimizer"] == "sgd") for p in points)
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)


def test_report_002_grid_has_20_points() -> None:
    points = grid_points(parse_space(REPORT_002, "s.yaml"))
    assert len(points) == 20
    assert {p["batch_size"] for p in points} == {4, 8, 12, 16}


def test_grid_defaults_for_categorical_and_small_int() -> None:
    space = parse_space(
        {"c": {"type": "categorical", "choices": ["a", "b"]}, "k": {"type": "int", "low": 1, "high": 3}}, "s"
    )
    assert len(grid_points(space)) == 6


def test_grid_needs_values_for_continuous_params() -> None:
    space = parse_space({"lr": {"type": "float", "low": 0.1, "high": 1.0}}, "s.yaml")
    with pytest.raises(SpecError, match=r"lr.grid.*add grid"):
        grid_points(space, "s.yaml")


def test_a_grid_past_its_limit_is_refused_as_it_grows_not_enumerated() -> None:
    # 10**8 points: enumerated, it took minutes and gigabytes before create-study said anything.
    ten = {"type": "int", "low": 0, "high": 9, "grid": list(range(10))}
    space = parse_space({name: ten for name in "abcdefgh"}, "s.yaml")
    with pytest.raises(SpecError, match=r"s.yaml: f.grid: makes the grid larger than 100,000 points"):
        grid_points(space, "s.yaml")
    assert len(grid_points(parse_space({name: ten for name in "abcde"}, "s.yaml"))) == 100_000


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        ({"lr": {"type": "floaty", "low": 0, "high": 1}}, "lr.type", "must be one of"),
        ({"lr": {"type": ["float"], "low": 0, "high": 1}}, "lr.type", "must be one of"),
        ({"lr": {"type": "float", "high": 1}}, "lr.low", "is required"),
        ({"lr": {"type": "float", "low": 2, "high": 1}}, "lr.low", "greater than high"),
        ({"lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "lr.low", "log-scale"),
        ({"lr": {"type": "float", "low": "a", "high": 1}}, "lr.low", "must be a number"),
        ({"n": {"type": "int", "low": 1.5, "high": 4}}, "n.low", "integer"),
        ({"n": {"type": "int", "low": 0, "high": 9, "step": 2}}, "n.high", "multiple of step"),
        ({"n": {"type": "int", "low": 0, "high": 8, "grid": [0, 10]}}, "n.grid", "outside"),
        ({"c": {"type": "categorical", "choices": []}}, "c.choices", "non-empty"),
        ({"c": {"type": "categorical", "choices": ["a"], "grid": ["b"]}}, "c.grid", "not among"),
        (
            {"m": {"type": "float", "low": 0, "high": 1, "when": {"opt": ["sgd"]}}},
            "m.when.opt",
            "not declared",
        ),
        ({"lr": {"type": "float", "low": 0, "high": 1, "lgo": True}}, "lr.lgo", "not a field"),
    ],
)
def test_bad_space_errors_name_field_and_fix(raw: dict, field: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_space(raw, "spaces/bad.yaml")
    error = info.value
    assert error.source == "spaces/bad.yaml"
    assert error.field == field
    assert fragment in str(error)
    assert "\n" not in str(error)


def test_condition_value_must_be_reachable() -> None:
    raw = {
        "opt": {"type": "categorical", "choices": ["adam", "sgd"]},
        "m": {"type": "float", "low": 0, "high": 1, "when": {"opt": ["rmsprop"]}},
    }
    with pytest.raises(SpecError, match="can never be taken"):
        parse_space(raw, "s.yaml")


def test_categorical_param_contains() -> None:
    param = CategoricalParam("c", ("a", 1))
    assert param.contains("a") and param.contains(1) and not param.contains("b")
