"""The canonical search space: one in-memory type, explicit converters to other libraries.

A search space is an ordered tuple of parameters. Each parameter may be *conditional*
(``when: {optimizer: [sgd]}``): it is only sampled when every named parent parameter took one
of the listed values. Parents must be declared before their children, so walking the tuple in
order always sees a parent's value before deciding whether a child is active.

Converters in this module: :func:`to_optuna_distributions`, :func:`suggest` (sampling through an
``optuna.Trial``), :func:`grid_points`. ConfigSpace and Ray Tune converters live next to the
backends that need them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hpo import _optuna
from hpo.errors import SpecError

Choice: TypeAlias = bool | int | float | str | None
ParamValue: TypeAlias = Choice


@dataclass(frozen=True)
class Condition:
    """Active when, for every parent name, the parent's value is one of the listed values."""

    requires: tuple[tuple[str, tuple[Choice, ...]], ...]

    def is_active(self, values: Mapping[str, Any]) -> bool:
        return all(name in values and values[name] in allowed for name, allowed in self.requires)

    def parents(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.requires)

    def to_dict(self) -> dict[str, list[Choice]]:
        return {name: list(allowed) for name, allowed in self.requires}


@dataclass(frozen=True)
class FloatParam:
    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None
    grid: tuple[float, ...] | None = None
    when: Condition | None = None
    kind: Literal["float"] = field(default="float", init=False)

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (self.low <= float(value) <= self.high)
        )


@dataclass(frozen=True)
class IntParam:
    name: str
    low: int
    high: int
    log: bool = False
    step: int = 1
    grid: tuple[int, ...] | None = None
    when: Condition | None = None
    kind: Literal["int"] = field(default="int", init=False)

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
            and (value - self.low) % self.step == 0
        )


@dataclass(frozen=True)
class CategoricalParam:
    name: str
    choices: tuple[Choice, ...]
    grid: tuple[Choice, ...] | None = None
    when: Condition | None = None
    kind: Literal["categorical"] = field(default="categorical", init=False)

    def contains(self, value: Any) -> bool:
        return value in self.choices


Param: TypeAlias = FloatParam | IntParam | CategoricalParam


@dataclass(frozen=True)
class SearchSpace:
    """An ordered, validated collection of parameters (parents before children)."""

    params: tuple[Param, ...]

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def is_conditional(self) -> bool:
        return any(p.when is not None for p in self.params)

    def active_params(self, values: Mapping[str, Any]) -> tuple[Param, ...]:
        """The parameters that are active given (at least) the values of their parents."""
        return tuple(p for p in self.params if p.when is None or p.when.is_active(values))

    def validate_config(self, config: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``config`` holds exactly the active parameters, in range."""
        active = {p.name: p for p in self.active_params(config)}
        missing = sorted(set(active) - set(config))
        extra = sorted(set(config) - set(active))
        if missing or extra:
            raise ValueError(f"configuration {dict(config)} misses {missing} or has inactive {extra}")
        for name, value in config.items():
            if not active[name].contains(value):
                raise ValueError(f"{name}={value!r} is outside its declared range")


# --------------------------------------------------------------------------- parsing

_PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step", "grid", "when"},
    "int": {"type", "low", "high", "log", "step", "grid", "when"},
    "categorical": {"type", "choices", "grid", "when"},
}
_EXAMPLE = "lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}"


def _number(source: str, where: str, value: Any, *, integer: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "an integer" if integer else "a number"
        raise SpecError(source, where, f"must be {kind}, got {value!r}", "write a plain number, e.g. 1.0e-3")
    if integer and not isinstance(value, int):
        if float(value).is_integer():
            return int(value)
        raise SpecError(source, where, f"must be an integer, got {value!r}", "use whole numbers for int")
    if not integer and not math.isfinite(float(value)):
        raise SpecError(source, where, f"must be finite, got {value!r}")
    return float(value) if not integer else value


def _parse_condition(source: str, where: str, raw: Any, declared: Mapping[str, Param]) -> Condition:
    if not isinstance(raw, Mapping) or not raw:
        raise SpecError(
            source,
            where,
            "must map parent parameter names to lists of values",
            "when: {optimizer: [sgd]}",
        )
    requires = []
    for parent, allowed in raw.items():
        if parent not in declared:
            raise SpecError(
                source,
                f"{where}.{parent}",
                "names a parameter that is not declared above this one",
                "declare the parent parameter first, or fix its name",
            )
        allowed_values = tuple(allowed) if isinstance(allowed, list | tuple) else (allowed,)
        parent_param = declared[parent]
        for value in allowed_values:
            if not parent_param.contains(value):
                raise SpecError(
                    source,
                    f"{where}.{parent}",
                    f"value {value!r} can never be taken by parameter {parent!r}",
                    "list values inside the parent's choices or range",
                )
        requires.append((str(parent), allowed_values))
    return Condition(tuple(requires))


def parse_param(source: str, name: str, raw: Any, declared: Mapping[str, Param]) -> Param:
    """Parse one parameter declaration; ``declared`` holds the parameters declared before it."""
    where = name
    if not isinstance(raw, Mapping):
        raise SpecError(source, where, f"must be a mapping, got {raw!r}", _EXAMPLE)
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in _PARAM_KEYS:
        raise SpecError(
            source, f"{where}.type", f"must be one of float, int, categorical, got {kind!r}", _EXAMPLE
        )
    unknown = sorted(set(raw) - _PARAM_KEYS[kind])
    if unknown:
        raise SpecError(
            source,
            f"{where}.{unknown[0]}",
            f"is not a field of a {kind} parameter",
            f"allowed fields: {', '.join(sorted(_PARAM_KEYS[kind]))}",
        )
    when = _parse_condition(source, f"{where}.when", raw["when"], declared) if "when" in raw else None

    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list | tuple) or not choices:
            raise SpecError(source, f"{where}.choices", "must be a non-empty list", "choices: [adam, sgd]")
        for choice in choices:
            if not isinstance(choice, None | bool | int | float | str):
                raise SpecError(source, f"{where}.choices", f"choice {choice!r} is not a scalar")
        if len(set(map(repr, choices))) != len(choices):
            raise SpecError(source, f"{where}.choices", "has duplicate values")
        chosen = raw.get("grid")
        if chosen is not None:
            if not isinstance(chosen, list | tuple) or not chosen:
                raise SpecError(source, f"{where}.grid", "must be a non-empty list of choices")
            for value in chosen:
                if value not in choices:
                    raise SpecError(source, f"{where}.grid", f"value {value!r} is not among the choices")
        return CategoricalParam(name, tuple(choices), tuple(chosen) if chosen else None, when)

    integer = kind == "int"
    for key in ("low", "high"):
        if key not in raw:
            raise SpecError(source, f"{where}.{key}", "is required", _EXAMPLE)
    low = _number(source, f"{where}.low", raw["low"], integer=integer)
    high = _number(source, f"{where}.high", raw["high"], integer=integer)
    if low > high:
        raise SpecError(source, f"{where}.low", f"low={low} is greater than high={high}", "swap them")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(source, f"{where}.log", f"must be true or false, got {log!r}")
    if log and low <= 0:
        raise SpecError(
            source,
            f"{where}.low",
            f"a log-scale range needs low > 0, got {low}",
            "raise low or set log: false",
        )
    step = raw.get("step")
    if step is not None:
        step = _number(source, f"{where}.step", step, integer=integer)
        if step <= 0:
            raise SpecError(source, f"{where}.step", f"must be positive, got {step}")
        if log and (not integer or step != 1):
            raise SpecError(source, f"{where}.step", "cannot be combined with log: true", "drop step or log")
    grid_raw = raw.get("grid")
    grid: tuple[Any, ...] | None = None
    if grid_raw is not None:
        if not isinstance(grid_raw, list | tuple) or not grid_raw:
            raise SpecError(source, f"{where}.grid", "must be a non-empty list of values", "grid: [1, 2, 4]")
        grid = tuple(_number(source, f"{where}.grid", v, integer=integer) for v in grid_raw)
        for value in grid:
            if not low <= value <= high:
                raise SpecError(
                    source,
                    f"{where}.grid",
                    f"value {value} lies outside [{low}, {high}]",
                    "widen low/high or drop the value",
                )
        if len(set(grid)) != len(grid):
            raise SpecError(source, f"{where}.grid", "has duplicate values")
    if integer:
        int_step = int(step) if step is not None else 1
        if (high - low) % int_step != 0:
            raise SpecError(
                source,
                f"{where}.high",
                f"high - low = {high - low} is not a multiple of step {int_step}",
                "adjust high so that the range divides evenly",
            )
        if grid is not None:
            for value in grid:
                if (value - low) % int_step != 0:
                    raise SpecError(source, f"{where}.grid", f"value {value} is not on the step {int_step}")
        return IntParam(name, int(low), int(high), bool(log), int_step, grid, when)
    return FloatParam(name, float(low), float(high), bool(log), step, grid, when)


def parse_space(raw: Any, source: str) -> SearchSpace:
    """Parse a mapping ``{name: declaration}`` into a :class:`SearchSpace`."""
    if not isinstance(raw, Mapping) or not raw:
        raise SpecError(source, "", "a search space must be a non-empty mapping of parameters", _EXAMPLE)
    declared: dict[str, Param] = {}
    for name, declaration in raw.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise SpecError(
                source, str(name), "parameter names must be identifiers", "use letters, digits and _"
            )
        declared[name] = parse_param(source, name, declaration, declared)
    return SearchSpace(tuple(declared.values()))


def space_to_dict(space: SearchSpace) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`parse_space` (used to store the resolved space with the study)."""
    out: dict[str, dict[str, Any]] = {}
    for p in space:
        entry: dict[str, Any]
        if isinstance(p, CategoricalParam):
            entry = {"type": "categorical", "choices": list(p.choices)}
        else:
            entry = {"type": p.kind, "low": p.low, "high": p.high}
            if p.log:
                entry["log"] = True
            if isinstance(p, FloatParam) and p.step is not None:
                entry["step"] = p.step
            if isinstance(p, IntParam) and p.step != 1:
                entry["step"] = p.step
        if p.grid is not None:
            entry["grid"] = list(p.grid)
        if p.when is not None:
            entry["when"] = p.when.to_dict()
        out[p.name] = entry
    return out


# --------------------------------------------------------------------------- Optuna


def to_optuna_distribution(param: Param) -> BaseDistribution:
    if isinstance(param, FloatParam):
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return IntDistribution(param.low, param.high, log=param.log, step=param.step)
    return CategoricalDistribution(param.choices)


def to_optuna_distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Every parameter's distribution (conditional ones included)."""
    return {p.name: to_optuna_distribution(p) for p in space}


def from_optuna_distributions(distributions: Mapping[str, BaseDistribution]) -> SearchSpace:
    """Build an unconditional space from Optuna distributions (the inverse of the converter)."""
    params: list[Param] = []
    for name, dist in distributions.items():
        if isinstance(dist, FloatDistribution):
            params.append(FloatParam(name, dist.low, dist.high, dist.log, dist.step))
        elif isinstance(dist, IntDistribution):
            params.append(IntParam(name, dist.low, dist.high, dist.log, dist.step))
        elif isinstance(dist, CategoricalDistribution):
            params.append(CategoricalParam(name, tuple(dist.choices)))
        else:  # pragma: no cover - Optuna has no other distribution types today
            raise TypeError(f"unsupported distribution {dist!r}")
    return SearchSpace(tuple(params))


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, ParamValue]:
    """Sample the active parameters of ``space`` through ``trial``, parents first."""
    values: dict[str, ParamValue] = {}
    for param in space:
        if param.when is not None and not param.when.is_active(values):
            continue
        values[param.name] = _optuna.suggest(trial, param.name, to_optuna_distribution(param))
    return values


# --------------------------------------------------------------------------- grid


def grid_values(param: Param, source: str = "search space") -> tuple[Choice, ...]:
    """The values a grid search visits for ``param``."""
    if param.grid is not None:
        return param.grid
    if isinstance(param, CategoricalParam):
        return param.choices
    if isinstance(param, IntParam) and not param.log and (param.high - param.low) // param.step < 64:
        return tuple(range(param.low, param.high + 1, param.step))
    raise SpecError(
        source,
        f"{param.name}.grid",
        "grid search needs explicit grid values for this parameter",
        f"add grid: [...] to {param.name}",
    )


# A grid is queued point by point when its study is created: past this it would take hours (and
# the memory of every point) before saying anything.
MAX_GRID_POINTS = 100_000


def grid_points(space: SearchSpace, source: str = "search space") -> list[dict[str, ParamValue]]:
    """Every configuration of the grid, each holding only the parameters active in it.

    Conditional parameters multiply the grid only where they are active, so
    ``optimizer: [adam, sgd]`` with ``momentum`` (when sgd) of 3 values gives 1 + 3 points.
    """
    points: list[dict[str, ParamValue]] = [{}]
    for param in space:
        values = grid_values(param, source)
        expanded: list[dict[str, ParamValue]] = []
        for point in points:
            if param.when is not None and not param.when.is_active(point):
                expanded.append(point)
                continue
            expanded.extend({**point, param.name: value} for value in values)
            if len(expanded) > MAX_GRID_POINTS:
                raise SpecError(
                    source,
                    f"{param.name}.grid",
                    f"makes the grid larger than {MAX_GRID_POINTS:,} points",
                    "fewer grid values, or sample the space with random or tpe",
                )
        points = expanded
    # Deduplicate while keeping order (identical points arise only from degenerate conditions).
    seen: set[tuple[tuple[str, Any], ...]] = set()
    unique = []
    for point in points:
        key = tuple(sorted(point.items()))
        if key not in seen:
            seen.add(key)
            unique.append(point)
    return unique


def grid_size(space: SearchSpace, source: str = "search space") -> int:
    return len(grid_points(space, source))
