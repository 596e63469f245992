"""hpo search spaces as ConfigSpace spaces: exact round trips, bounds, log scales and conditions."""

from __future__ import annotations

from typing import Any

import pytest
from ConfigSpace import (
    AndConjunction,
    CategoricalHyperparameter,
    Configuration,
    EqualsCondition,
    InCondition,
    UniformFloatHyperparameter,
    UniformIntegerHyperparameter,
)
from optuna.distributions import FloatDistribution

from hpo.bohb import ConfigSpaceCodec
from hpo.space import parse_space, to_optuna_distributions


def codec_for(raw: dict[str, Any], seed: int = 0) -> ConfigSpaceCodec:
    return ConfigSpaceCodec(parse_space(raw, "test space"), seed=seed)


def samples(codec: ConfigSpaceCodec, n: int = 300) -> list[dict[str, Any]]:
    return [codec.sample() for _ in range(n)]


def test_integer_bounds_are_reached_and_kept() -> None:
    codec = codec_for({"layers": {"type": "int", "low": 1, "high": 4}})
    hp = codec.configspace["layers"]
    assert isinstance(hp, UniformIntegerHyperparameter) and (hp.lower, hp.upper) == (1, 4)
    values = [s["layers"] for s in samples(codec)]
    assert set(values) == {1, 2, 3, 4} and all(type(v) is int for v in values)
    for v in (1, 4):
        assert codec.decode(codec.encode({"layers": v})) == {"layers": v}


def test_log_scales_are_log_in_configspace_and_round_trip_exactly() -> None:
    codec = codec_for(
        {
            "lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-1, "log": True},
            "batch": {"type": "int", "low": 16, "high": 1024, "log": True},
        }
    )
    lr, batch = codec.configspace["lr"], codec.configspace["batch"]
    assert isinstance(lr, UniformFloatHyperparameter) and lr.log and (lr.lower, lr.upper) == (1e-5, 1e-1)
    assert isinstance(batch, UniformIntegerHyperparameter) and batch.log
    for params in ({"lr": 1e-5, "batch": 16}, {"lr": 1e-1, "batch": 1024}, {"lr": 3.3e-4, "batch": 77}):
        assert codec.decode(codec.encode(params)) == params
    drawn = samples(codec, 400)
    lrs = [s["lr"] for s in drawn]
    assert all(1e-5 <= v <= 1e-1 for v in lrs)
    # log-uniform: about half of the draws below the geometric middle 1e-3 (uniform would give ~1%)
    assert 0.35 < sum(v < 1e-3 for v in lrs) / len(lrs) < 0.65
    assert all(16 <= s["batch"] <= 1024 and type(s["batch"]) is int for s in drawn)


def test_decode_clamps_values_a_rounding_step_outside_the_bounds() -> None:
    codec = codec_for({"lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-1, "log": True}})
    assert codec.decode({"lr": 0.1 + 1e-17 * 7}) == {"lr": 0.1}
    assert codec.decode({"lr": 9.99999999e-6}) == {"lr": 1e-5}


def test_stepped_parameters_become_step_indices() -> None:
    # ConfigSpace 1.x has no q=; a step index keeps every value on the grid Optuna expects.
    codec = codec_for(
        {
            "width": {"type": "int", "low": 32, "high": 256, "step": 32},
            "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        }
    )
    width, dropout = codec.configspace["width"], codec.configspace["dropout"]
    assert isinstance(width, UniformIntegerHyperparameter) and (width.lower, width.upper) == (0, 7)
    assert isinstance(dropout, UniformIntegerHyperparameter) and (dropout.lower, dropout.upper) == (0, 5)
    dist = FloatDistribution(0.0, 0.5, step=0.1)
    drawn = samples(codec, 400)
    assert {s["width"] for s in drawn} == set(range(32, 257, 32))
    assert all(dist._contains(s["dropout"]) for s in drawn)
    assert {round(s["dropout"], 9) for s in drawn} == {0.0, 0.1, 0.2, 0.3, 0.4, 0.5}
    assert codec.decode(codec.encode({"width": 96, "dropout": 0.3})) == {"width": 96, "dropout": 0.3}


def test_a_float_step_that_does_not_divide_the_range_uses_optunas_grid() -> None:
    with pytest.warns(UserWarning, match="not divisible"):  # Optuna's own notice; it lowers high
        codec = codec_for({"p": {"type": "float", "low": 0.0, "high": 0.55, "step": 0.1}})
    hp = codec.configspace["p"]
    assert isinstance(hp, UniformIntegerHyperparameter) and (hp.lower, hp.upper) == (0, 5)
    assert max(s["p"] for s in samples(codec)) == 0.5


def test_categorical_choices_of_any_scalar_type_round_trip() -> None:
    codec = codec_for({"act": {"type": "categorical", "choices": [None, True, 1, 2.5, "relu"]}})
    assert isinstance(codec.configspace["act"], CategoricalHyperparameter)
    for value in (None, True, 1, 2.5, "relu"):
        decoded = codec.decode(codec.encode({"act": value}))
        assert decoded == {"act": value} and type(decoded["act"]) is type(value)
    assert {repr(s["act"]) for s in samples(codec)} == {"None", "True", "1", "2.5", "'relu'"}


def test_single_valued_parameters_stay_out_of_configspace_but_come_back() -> None:
    codec = codec_for(
        {
            "x": {"type": "float", "low": 0, "high": 1},
            "opt": {"type": "categorical", "choices": ["adam", "sgd"]},
            "depth": {"type": "int", "low": 3, "high": 3},
            "mom": {"type": "categorical", "choices": [0.9], "when": {"opt": ["sgd"]}},
            # a child of the single-valued, conditional "mom" inherits mom's own condition ...
            "nesterov": {"type": "categorical", "choices": [True, False], "when": {"mom": [0.9]}},
            # ... and one that needs opt to be sgd and adam at once can never be active
            "odd": {"type": "float", "low": 0, "high": 1, "when": {"mom": [0.9], "opt": ["adam"]}},
        }
    )
    assert sorted(codec.configspace) == ["nesterov", "opt", "x"] and codec.dimensions == 3
    (condition,) = codec.configspace.conditions
    assert isinstance(condition, EqualsCondition)
    assert (condition.child.name, condition.parent.name, condition.value) == ("nesterov", "opt", 1)
    sgd = {"x": 0.5, "opt": "sgd", "depth": 3, "mom": 0.9, "nesterov": False}
    adam = {"x": 0.25, "opt": "adam", "depth": 3}
    assert codec.encode(sgd) == {"x": 0.5, "opt": 1, "nesterov": 1}
    for params in (sgd, adam):
        assert codec.decode(codec.encode(params)) == params
    assert all("odd" not in p for p in samples(codec, 100))


def test_conditions_become_configspace_conditions() -> None:
    codec = codec_for(
        {
            "optimizer": {"type": "categorical", "choices": ["adam", "sgd", "rmsprop"]},
            "momentum": {
                "type": "float",
                "low": 0.0,
                "high": 0.99,
                "when": {"optimizer": ["sgd", "rmsprop"]},
            },
            "nesterov": {"type": "categorical", "choices": [True, False], "when": {"optimizer": ["sgd"]}},
            "layers": {"type": "int", "low": 1, "high": 4},
            "width2": {"type": "int", "low": 8, "high": 64, "step": 8, "when": {"layers": [2, 3, 4]}},
            "gate": {
                "type": "categorical",
                "choices": ["a", "b"],
                "when": {"optimizer": ["sgd"], "layers": [4]},
            },
            "damp": {"type": "float", "low": 0, "high": 1, "when": {"momentum": [0.5]}},
        }
    )
    conditions = {c.child.name: c for c in codec.configspace.conditions}
    assert isinstance(conditions["momentum"], InCondition) and sorted(conditions["momentum"].values) == [1, 2]
    assert isinstance(conditions["nesterov"], EqualsCondition) and conditions["nesterov"].value == 1
    assert isinstance(conditions["width2"], InCondition) and sorted(conditions["width2"].values) == [2, 3, 4]
    assert isinstance(conditions["gate"], AndConjunction)
    assert isinstance(conditions["damp"], EqualsCondition) and conditions["damp"].parent.name == "momentum"


CONDITIONAL = {
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
    "momentum": {"type": "float", "low": 0.0, "high": 0.99, "when": {"optimizer": ["sgd"]}},
    "nesterov": {"type": "categorical", "choices": [True, False], "when": {"optimizer": ["sgd"]}},
    "betas": {"type": "categorical", "choices": ["default", "slow"], "when": {"optimizer": ["adam"]}},
    "beta2": {"type": "float", "low": 0.9, "high": 0.9999, "when": {"betas": ["slow"]}},
    "layers": {"type": "int", "low": 1, "high": 3},
    "width2": {"type": "int", "low": 16, "high": 128, "step": 16, "when": {"layers": [2, 3]}},
    "width3": {
        "type": "int",
        "low": 16,
        "high": 128,
        "step": 16,
        "when": {"layers": [3], "optimizer": ["sgd"]},
    },
}


def test_every_sample_holds_exactly_the_parameters_hpo_would_suggest() -> None:
    codec = codec_for(CONDITIONAL, seed=5)
    space = codec.space
    drawn = samples(codec, 600)
    for params in drawn:
        space.validate_config(params)  # exactly the active parameters, each in range
        assert codec.decode(codec.encode(params)) == params
        config = Configuration(codec.configspace, values=codec.encode(params))
        assert set(dict(config)) == {n for n in params if n in codec.configspace}
    # every branch of the tree is visited
    assert any("beta2" in p for p in drawn) and any("width3" in p for p in drawn)
    assert any(p["optimizer"] == "adam" and p["layers"] == 3 and "width3" not in p for p in drawn)


def test_encode_rejects_configurations_that_are_not_valid() -> None:
    codec = codec_for(CONDITIONAL)
    good = {"optimizer": "adam", "lr": 0.01, "betas": "default", "layers": 1}
    codec.encode(good)
    with pytest.raises(ValueError):
        codec.encode({**good, "momentum": 0.5})  # inactive for adam
    with pytest.raises(ValueError):
        codec.encode({k: v for k, v in good.items() if k != "lr"})
    with pytest.raises(ValueError):
        codec.encode({**good, "lr": 0.5})


def test_decode_rejects_a_configuration_missing_an_active_parameter() -> None:
    codec = codec_for(CONDITIONAL)
    with pytest.raises(ValueError, match="momentum"):
        codec.decode({"optimizer": 1, "lr": 0.01, "nesterov": 0, "layers": 1})


def test_same_seed_same_samples() -> None:
    assert samples(codec_for(CONDITIONAL, seed=11), 20) == samples(codec_for(CONDITIONAL, seed=11), 20)
    assert samples(codec_for(CONDITIONAL, seed=11), 20) != samples(codec_for(CONDITIONAL, seed=12), 20)


def test_codec_covers_what_optuna_sees() -> None:
    codec = codec_for(CONDITIONAL)
    distributions = to_optuna_distributions(codec.space)
    for params in samples(codec, 100):
        for name, value in params.items():
            dist = distributions[name]
            assert dist._contains(dist.to_internal_repr(value)), (name, value)
