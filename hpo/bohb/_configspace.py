"""The hpo search space as a ConfigSpace ``ConfigurationSpace``, and values back and forth.

hpbandster's KDE works on ConfigSpace's vector form, so the encoding matters:

* categorical parameters become a ``Categorical`` over the *indices* of their choices (hpo allows
  ``None``, booleans and mixed types as choices; indices are what the KDE models anyway);
* stepped parameters (``step:`` on an int or float) become an ``Integer`` over the step index,
  because ConfigSpace 1.x has no quantized hyperparameters (the ``q=`` that Ray's TuneBOHB relies on);
* parameters with a single possible value are left out (the KDE cannot model a zero-width range,
  and ConfigSpace rejects one); conditions on them are resolved here, once;
* ``when:`` conditions become ``EqualsCondition``/``InCondition``, several parents an
  ``AndConjunction``; a child whose condition can never hold is left out.

Decoding walks the hpo space in order and uses hpo's own condition test, so a decoded configuration
holds exactly the parameters that :func:`hpo.space.suggest` will ask for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ConfigSpace import (
    AndConjunction,
    Categorical,
    Configuration,
    ConfigurationSpace,
    EqualsCondition,
    Float,
    InCondition,
    Integer,
)
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hpo.space import CategoricalParam, FloatParam, IntParam, Param, ParamValue, SearchSpace


@dataclass(frozen=True)
class _Encoding:
    """How one hpo parameter is represented: as a constant, by index, or by its own value."""

    param: Param
    kind: str  # "constant" | "never" | "choice" | "index" | "int" | "float"
    constant: ParamValue = None
    low: float = 0.0
    high: float = 0.0
    step: float = 1.0

    def encode(self, value: Any) -> Any:
        if self.kind == "choice":
            assert isinstance(self.param, CategoricalParam)
            for index, choice in enumerate(self.param.choices):
                if type(choice) is type(value) and choice == value:  # 1 and True are different choices
                    return index
            return CategoricalDistribution(self.param.choices).to_internal_repr(value)
        if self.kind == "index":
            return round((float(value) - self.low) / self.step)
        if self.kind == "int":
            return int(value)
        return min(max(float(value), self.low), self.high)

    def decode(self, value: Any) -> ParamValue:
        # ConfigSpace hands back numpy scalars and may round a log-scale value one ulp past a bound;
        # Optuna would then silently reject the value, so clamp and convert to Python types.
        if self.kind == "choice":
            assert isinstance(self.param, CategoricalParam)
            return self.param.choices[int(value)]
        if self.kind == "index":
            k = round(float(value))
            if isinstance(self.param, IntParam):
                return int(min(max(int(self.low) + k * int(self.step), self.low), self.high))
            # Decimal arithmetic, as Optuna uses for its grid: 3 steps of 0.1 are 0.3, not 0.30000000000000004
            point = float(Decimal(str(self.low)) + k * Decimal(str(self.step)))
            return min(max(point, self.low), self.high)
        if self.kind == "int":
            return int(min(max(round(float(value)), self.low), self.high))
        return float(min(max(float(value), self.low), self.high))


def _encoding(param: Param) -> _Encoding:
    if isinstance(param, CategoricalParam):
        if len(param.choices) == 1:
            return _Encoding(param, "constant", constant=param.choices[0])
        return _Encoding(param, "choice")
    if isinstance(param, IntParam):
        dist = IntDistribution(param.low, param.high, log=param.log, step=param.step)
        if dist.low == dist.high:
            return _Encoding(param, "constant", constant=int(dist.low))
        if dist.step != 1:
            return _Encoding(param, "index", low=dist.low, high=dist.high, step=dist.step)
        return _Encoding(param, "int", low=dist.low, high=dist.high)
    fdist = FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if fdist.low == fdist.high:
        return _Encoding(param, "constant", constant=float(fdist.low))
    if fdist.step is not None:  # Optuna has already moved high onto the step grid
        return _Encoding(param, "index", low=fdist.low, high=fdist.high, step=fdist.step)
    return _Encoding(param, "float", low=fdist.low, high=fdist.high)


def _hyperparameter(enc: _Encoding) -> Any:
    param = enc.param
    if enc.kind == "choice":
        assert isinstance(param, CategoricalParam)
        return Categorical(param.name, list(range(len(param.choices))))
    if enc.kind == "index":
        return Integer(param.name, (0, round((enc.high - enc.low) / enc.step)))
    log = isinstance(param, IntParam | FloatParam) and param.log
    if enc.kind == "int":
        return Integer(param.name, (int(enc.low), int(enc.high)), log=log)
    return Float(param.name, (enc.low, enc.high), log=log)


class ConfigSpaceCodec:
    """A :class:`~hpo.space.SearchSpace` as a ``ConfigurationSpace``, with exact round trips.

    ``encode`` turns hpo parameter values into ConfigSpace values (only the parameters ConfigSpace
    models); ``decode`` turns a ConfigSpace configuration back into hpo values, adding the
    single-valued parameters that are active. ``seed`` seeds the space's own sampler.
    """

    def __init__(self, space: SearchSpace, seed: int | None = None) -> None:
        self.space = space
        self.configspace = ConfigurationSpace(seed=seed)
        self._encodings: dict[str, _Encoding] = {}
        # When each parameter is active, in terms of the parameters ConfigSpace models: parent name
        # -> the encoded parent values that activate it. A single-valued parent is not modelled, so
        # its children inherit its own requirements instead.
        requires: dict[str, dict[str, frozenset[Any]]] = {}
        conditions = []
        for param in space:
            enc = _encoding(param)
            needs: dict[str, frozenset[Any]] = {}
            for parent_name, allowed in param.when.requires if param.when is not None else ():
                parent = self._encodings[parent_name]
                clauses: list[tuple[str, frozenset[Any]]]
                if parent.kind == "constant" and parent.constant in allowed:
                    clauses = list(requires[parent_name].items())
                elif parent.kind in ("constant", "never"):
                    enc = _Encoding(param, "never")
                    break
                else:
                    clauses = [(parent_name, self._activating(parent, allowed))]
                for name, values in clauses:
                    needs[name] = needs[name] & values if name in needs else values
                    if not needs[name]:
                        enc = _Encoding(param, "never")
                if enc.kind == "never":
                    break
            self._encodings[param.name] = enc
            requires[param.name] = needs
            if enc.kind in ("constant", "never"):
                continue
            self.configspace.add(_hyperparameter(enc))
            if needs:
                conditions.append(self._condition(param.name, needs))
        if conditions:
            self.configspace.add(conditions)

    @staticmethod
    def _activating(parent: _Encoding, allowed: tuple[Any, ...]) -> frozenset[Any]:
        if isinstance(parent.param, CategoricalParam):
            # hpo's test is ``value in allowed``; keep the choice indices that pass it.
            return frozenset(i for i, choice in enumerate(parent.param.choices) if choice in allowed)
        return frozenset(parent.encode(value) for value in allowed)

    def _condition(self, child_name: str, needs: Mapping[str, frozenset[Any]]) -> Any:
        child = self.configspace[child_name]
        parts: list[Any] = []
        for parent_name, values in needs.items():
            parent = self.configspace[parent_name]
            ordered = sorted(values)
            if len(ordered) == 1:
                parts.append(EqualsCondition(child, parent, ordered[0]))
            else:
                parts.append(InCondition(child, parent, ordered))
        return parts[0] if len(parts) == 1 else AndConjunction(*parts)

    @property
    def dimensions(self) -> int:
        """The number of hyperparameters ConfigSpace models (what hpbandster's KDE sees)."""
        return len(self.configspace)

    def encode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """ConfigSpace values for hpo ``params``; ``ValueError`` unless they form a valid configuration."""
        self.space.validate_config(params)
        values = {
            name: self._encodings[name].encode(value)
            for name, value in params.items()
            if self._encodings[name].kind not in ("constant", "never")
        }
        Configuration(self.configspace, values=values)  # raises ValueError if ConfigSpace disagrees
        return values

    def decode(self, values: Mapping[str, Any]) -> dict[str, ParamValue]:
        """hpo values (active parameters only, in space order) for a ConfigSpace configuration."""
        out: dict[str, ParamValue] = {}
        for param in self.space:
            if param.when is not None and not param.when.is_active(out):
                continue
            enc = self._encodings[param.name]
            if enc.kind == "constant":
                out[param.name] = enc.constant
                continue
            if enc.kind == "never" or param.name not in values:
                raise ValueError(f"configuration {dict(values)} lacks the active parameter {param.name!r}")
            value = values[param.name]
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"the configuration {dict(values)} has no value for {param.name!r}")
            out[param.name] = enc.decode(value)
        return out

    def sample(self) -> dict[str, ParamValue]:
        """One configuration from ConfigSpace's prior (uniform, log-uniform where ``log``)."""
        return self.decode(dict(self.configspace.sample_configuration()))
