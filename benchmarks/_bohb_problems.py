"""The problems of ``benchmarks/bohb_compare.py``: multi-fidelity learning curves, numpy only.

This module imports nothing from hpo (only numpy and the standard library), because the runner of
the other optimisers (``benchmarks/_bohb_external.py``) imports it inside their own virtual
environments, where hpo is not installed.

Every problem is minimised and has ``max_epochs`` epochs (``R``). A configuration's learning curve
is a pure function of the configuration and the run's seed: the value after epoch ``e`` is
``problem.value(params, e, seed)``. So training a configuration for ``e`` epochs and continuing it
to ``e'`` gives the same curve as training it to ``e'`` at once (what continuation relies on), and a
configuration retrained from scratch sees the same curve again. A run's score is the *regret* of its
incumbent, the configuration with the lowest value observed at the full budget (``R`` epochs):
``problem.regret(params, seed)``, the configuration's true full-budget value minus the problem's
optimum (for the noisy counting ones the true value is the noise-free mean, not the observed one).

Problems (``PROBLEMS``):

* ``branin`` — Kandasamy et al.'s (2017) multi-fidelity Branin, fidelity ``z = epoch / 27``;
* ``counting_ones`` — the BOHB paper's counting ones (Falkner et al. 2018, section 5.1) with 8
  binary categorical and 8 continuous parameters; epoch ``e`` is ``9 e`` Bernoulli draws per
  continuous parameter (27 epochs: the paper's 243 draws; its budgets 9, 27, 81, 243);
* ``hartmann6`` — Hartmann-6 with the multi-fidelity perturbation of Kandasamy et al. (2017)
  (``alpha' = alpha - 0.1 (1 - z)``), ``z = epoch / 27``;
* ``digits_replay`` — the replay table ``benchmarks/data/digits_replay.json`` (``hpo tabulate
  studies/digits_compare.yaml --points-per-param 9``: 81 real learning curves, 25 epochs, of an MLP
  on the digits): a configuration's curve is that of the tabulated configuration nearest to it (the
  rule of :mod:`hpo.compare._replay`: normalised space, log scale for log parameters).

Budgets: 1, 3, 9, 27 epochs (``min_budget`` 1, eta 3) on the three synthetic problems; 3, 8, 25
epochs on the replay table (``min_budget`` 25/9, eta 3; budgets rounded to whole epochs).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

ETA = 3
DATA = Path(__file__).resolve().parent / "data"
REPLAY_TABLE = DATA / "digits_replay.json"

BRANIN_MINIMUM = 0.397887357729738
HARTMANN6_MINIMUM = -3.32236801141551
N_ONES = 8  # counting ones: categorical and continuous parameters each
DRAWS_PER_EPOCH = 9

# A search space in hpo's study-file form: {name: {"type": "float"|"int"|"categorical", ...}}.
SpaceSpec = Mapping[str, Mapping[str, Any]]


def budget_epochs(budget: float) -> int:
    """Whole epochs for a budget: rounded half up, at least one (hpo.bohb.budget_epochs's rule)."""
    return max(1, math.floor(budget + 0.5))


@dataclass(frozen=True)
class Problem:
    name: str
    space: SpaceSpec
    max_epochs: int
    min_budget: float
    curve: Callable[[Mapping[str, Any], int], list[float]] = field(repr=False)
    regret_fn: Callable[[Mapping[str, Any], int], float] = field(repr=False)

    def value(self, params: Mapping[str, Any], epoch: int, seed: int) -> float:
        """The value after ``epoch`` epochs (1-based) of ``params`` in the run seeded ``seed``."""
        return self.curve(params, seed)[epoch - 1]

    def regret(self, params: Mapping[str, Any], seed: int) -> float:
        return self.regret_fn(params, seed)

    @property
    def budgets(self) -> list[int]:
        """The Hyperband budgets in whole epochs, smallest first (hpbandster's geometric plan)."""
        steps = math.floor(math.log(self.max_epochs / self.min_budget) / math.log(ETA) + 1e-9)
        return [budget_epochs(self.max_epochs * ETA ** (-s)) for s in range(steps, -1, -1)]


# ----------------------------------------------------------------------------- Branin


def branin(x1: float, x2: float, z: float = 1.0) -> float:
    b = 5.1 / (4 * math.pi**2) - 0.01 * (1 - z)
    c = 5 / math.pi - 0.1 * (1 - z)
    t = 1 / (8 * math.pi) + 0.05 * (1 - z)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def _branin_curve(params: Mapping[str, Any], seed: int) -> list[float]:
    x, y = float(params["x"]), float(params["y"])
    return [branin(x, y, e / 27) for e in range(1, 28)]


def _branin_regret(params: Mapping[str, Any], seed: int) -> float:
    return branin(float(params["x"]), float(params["y"])) - BRANIN_MINIMUM


# ----------------------------------------------------------------------------- counting ones


def _stable_seed(seed: int, params: Mapping[str, Any]) -> list[int]:
    digest = hashlib.sha256(repr(sorted((k, float(v)) for k, v in params.items())).encode()).digest()
    return [seed % 2**32, int.from_bytes(digest[:8], "little")]


def _ones_curve(params: Mapping[str, Any], seed: int) -> list[float]:
    ones = sum(float(params[f"c{i}"]) for i in range(N_ONES))
    p = np.array([float(params[f"x{i}"]) for i in range(N_ONES)])
    # One draw stream per (run seed, configuration): continuing a configuration adds draws to the
    # same sample, as more epochs add data to the same training run.
    uniform = np.random.default_rng(_stable_seed(seed, params)).random((27 * DRAWS_PER_EPOCH, N_ONES))
    means = np.cumsum(uniform < p, axis=0)[DRAWS_PER_EPOCH - 1 :: DRAWS_PER_EPOCH]
    means = means / (DRAWS_PER_EPOCH * np.arange(1, 28))[:, None]
    return [float(-(ones + m.sum()) / (2 * N_ONES)) for m in means]


def _ones_regret(params: Mapping[str, Any], seed: int) -> float:
    total = sum(float(params[f"c{i}"]) + float(params[f"x{i}"]) for i in range(N_ONES))
    return 1 - total / (2 * N_ONES)


# ----------------------------------------------------------------------------- Hartmann-6

_H_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H_A = np.array(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
)
_H_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)


def hartmann6(x: np.ndarray, z: float = 1.0) -> float:
    alpha = _H_ALPHA - 0.1 * (1 - z)
    return float(-(alpha * np.exp(-(_H_A * (x[None, :] - _H_P) ** 2).sum(axis=1))).sum())


def _hartmann_curve(params: Mapping[str, Any], seed: int) -> list[float]:
    x = np.array([float(params[f"x{i}"]) for i in range(6)])
    return [hartmann6(x, e / 27) for e in range(1, 28)]


def _hartmann_regret(params: Mapping[str, Any], seed: int) -> float:
    return hartmann6(np.array([float(params[f"x{i}"]) for i in range(6)])) - HARTMANN6_MINIMUM


# ----------------------------------------------------------------------------- replay table


@cache
def _table() -> tuple[dict[str, Any], list[tuple[dict[str, Any], list[float]]], float]:
    data = json.loads(REPLAY_TABLE.read_text())
    metric = data["metric"]
    entries = []
    for entry in data["entries"]:
        values = entry["metrics"][metric] if entry["state"] == "COMPLETE" else []
        curve = [float(v) if math.isfinite(v) else math.inf for v in values]
        curve += [math.inf] * (data["max_epochs"] - len(curve))  # a failed or short run
        entries.append((entry["params"], curve))
    best = min(curve[-1] for _, curve in entries)
    return data["definition"]["search_space"], entries, best


def _normalise(spec: Mapping[str, Any], value: Any) -> float:
    low, high, x = float(spec["low"]), float(spec["high"]), float(value)
    if spec.get("log"):
        low, high, x = math.log(low), math.log(high), math.log(max(x, 1e-300))
    return 0.0 if high == low else (x - low) / (high - low)


@cache
def _nearest(key: tuple[tuple[str, Any], ...]) -> list[float]:
    space, entries, _ = _table()
    params = dict(key)

    def distance(other: Mapping[str, Any]) -> float:
        total = 0.0
        for name, spec in space.items():
            if spec["type"] == "categorical":
                total += float(params[name] != other[name])
            else:
                total += (_normalise(spec, params[name]) - _normalise(spec, other[name])) ** 2
        return total

    return min(entries, key=lambda entry: distance(entry[0]))[1]  # the first one on ties


def _replay_curve(params: Mapping[str, Any], seed: int) -> list[float]:
    return _nearest(tuple(sorted(params.items())))


def _replay_regret(params: Mapping[str, Any], seed: int) -> float:
    return _replay_curve(params, seed)[-1] - _table()[2]


def _replay_space() -> dict[str, Any]:
    space = json.loads(REPLAY_TABLE.read_text())["definition"]["search_space"]
    return {name: {k: v for k, v in spec.items() if k != "grid"} for name, spec in space.items()}


def _problems() -> dict[str, Problem]:
    ones_space: dict[str, Any] = {f"c{i}": {"type": "categorical", "choices": [0, 1]} for i in range(N_ONES)}
    ones_space.update({f"x{i}": {"type": "float", "low": 0.0, "high": 1.0} for i in range(N_ONES)})
    problems = [
        Problem(
            "branin",
            {
                "x": {"type": "float", "low": -5.0, "high": 10.0},
                "y": {"type": "float", "low": 0.0, "high": 15.0},
            },
            27,
            1.0,
            _branin_curve,
            _branin_regret,
        ),
        Problem("counting_ones", ones_space, 27, 1.0, _ones_curve, _ones_regret),
        Problem(
            "hartmann6",
            {f"x{i}": {"type": "float", "low": 0.0, "high": 1.0} for i in range(6)},
            27,
            1.0,
            _hartmann_curve,
            _hartmann_regret,
        ),
    ]
    if REPLAY_TABLE.exists():
        problems.append(Problem("digits_replay", _replay_space(), 25, 25 / 9, _replay_curve, _replay_regret))
    return {p.name: p for p in problems}


PROBLEMS = _problems()


def sample_random(space: SpaceSpec, rng: np.random.Generator) -> dict[str, Any]:
    """A configuration drawn uniformly (log-uniformly for log parameters) from ``space``."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            params[name] = spec["choices"][int(rng.integers(len(spec["choices"])))]
        elif spec["type"] == "int":
            params[name] = int(rng.integers(int(spec["low"]), int(spec["high"]) + 1))
        elif spec.get("log"):
            params[name] = float(math.exp(rng.uniform(math.log(spec["low"]), math.log(spec["high"]))))
        else:
            params[name] = float(rng.uniform(spec["low"], spec["high"]))
    return params


class Trajectory:
    """A run's cost in epochs trained and its incumbent's regret after each evaluation."""

    def __init__(self, problem: Problem, seed: int) -> None:
        self.problem, self.seed = problem, seed
        self.epochs = 0  # epochs actually trained
        self.evaluations = 0
        self.best_value = math.inf
        self.regret = math.inf
        self.points: list[tuple[int, float]] = []  # (epochs so far, incumbent regret), on change
        self.history: list[tuple[dict[str, Any], int, int]] = []  # (params, trained, reached)

    def add(self, params: Mapping[str, Any], trained: int, reached: int, value: float) -> None:
        """An evaluation that trained ``trained`` epochs and ended at epoch ``reached`` with ``value``."""
        self.epochs += trained
        self.evaluations += 1
        self.history.append((dict(params), trained, reached))
        if reached == self.problem.max_epochs and value < self.best_value:
            self.best_value = value
            regret = self.problem.regret(params, self.seed)
            if regret != self.regret:
                self.regret = regret
                self.points.append((self.epochs, regret))

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epochs": self.epochs,
            "evaluations": self.evaluations,
            "points": self.points,
        }
