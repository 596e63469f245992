"""BOHB against random search with Hyperband (and against hpbandster's own BOHB), 20 seeds each.

Three optimisers run the same Hyperband plan (hpbandster's brackets, eta=3, four budgets):

* **BOHB (hpo)** — :class:`hpo.bohb.BOHBSampler`, driven through an Optuna study as hpo's workers
  drive it (plan and model rebuilt from the study's trials);
* **BOHB (hpbandster)** — hpbandster 0.7.4's own ``SuccessiveHalving`` iterations and KDE config
  generator, in its master's scheduling loop with one worker (no Pyro4), as the reference;
* **random+HB** — hpo's sampler with ``random_fraction=1``: every new configuration from the prior,
  which is exactly hpbandster's ``HyperBand`` optimizer.

Problems (both minimised):

* **counting ones** — the BOHB paper's own benchmark (Falkner et al. 2018, section 5.1): 4 binary
  categorical and 4 continuous parameters; the loss is minus the mean of the categoricals and of
  ``budget`` Bernoulli draws with the continuous parameters as probabilities (budgets 9 to 243
  draws). Regret: 1 minus the *true* mean of the incumbent configuration.
* **Branin** — Kandasamy et al.'s multi-fidelity Branin, fidelity ``budget / 27`` (budgets 1 to 27).
  Regret: incumbent value minus the minimum 0.397887.

The incumbent after each evaluation is the configuration with the lowest loss observed at the full
budget (hpbandster's incumbent trajectory). The table gives the median regret over the seeds once a
given budget has been consumed (in full-budget evaluations, R), the ratio BOHB (hpo) / random+HB
(below 1: BOHB is ahead) and on how many seeds BOHB (hpo)'s regret was at most random+HB's.

Run:  .venv/bin/python benchmarks/bohb_vs_random.py          (about 10 minutes on 2 cores)
      .venv/bin/python benchmarks/bohb_vs_random.py --seeds 3 (a quick look)
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from hpo_bohb_objectives import BRANIN_MINIMUM, branin

from hpo.bohb import BOHBSampler, ConfigSpaceCodec, HyperbandSchedule, trial_budget
from hpo.space import SearchSpace, parse_space, suggest

ETA = 3
CHECKPOINTS = (5, 10, 15, 20, 30, 45)  # consumed budget, in full-budget evaluations (R)
N_BITS = 4  # counting ones: categorical and continuous parameters each

# evaluate(params, budget, rng) -> (observed loss, regret of the configuration)
Evaluate = Callable[[Mapping[str, Any], float, np.random.Generator], tuple[float, float]]


@dataclass(frozen=True)
class Problem:
    space: SearchSpace
    min_budget: float
    max_budget: float
    evaluate: Evaluate


def _counting_ones(params: Mapping[str, Any], budget: float, rng: np.random.Generator) -> tuple[float, float]:
    ones = sum(params[f"c{i}"] for i in range(N_BITS))
    probabilities = [params[f"x{i}"] for i in range(N_BITS)]
    draws = sum(rng.binomial(int(budget), p) / int(budget) for p in probabilities)
    return -(ones + draws) / (2 * N_BITS), 1 - (ones + sum(probabilities)) / (2 * N_BITS)


def _branin(params: Mapping[str, Any], budget: float, rng: np.random.Generator) -> tuple[float, float]:
    return branin(params["x1"], params["x2"], budget / 27), branin(
        params["x1"], params["x2"]
    ) - BRANIN_MINIMUM


PROBLEMS = {
    "counting ones (4+4)": Problem(
        parse_space(
            {
                **{f"c{i}": {"type": "categorical", "choices": [0, 1]} for i in range(N_BITS)},
                **{f"x{i}": {"type": "float", "low": 0.0, "high": 1.0} for i in range(N_BITS)},
            },
            "counting ones",
        ),
        9,
        243,
        _counting_ones,
    ),
    "branin (2-D)": Problem(
        parse_space(
            {"x1": {"type": "float", "low": -5, "high": 10}, "x2": {"type": "float", "low": 0, "high": 15}},
            "branin",
        ),
        1,
        27,
        _branin,
    ),
}


class _Trajectory:
    """Consumed budget and the incumbent's regret after every evaluation."""

    def __init__(self, max_budget: float) -> None:
        self.max_budget = max_budget
        self.consumed = 0.0
        self.best_loss = math.inf
        self.regret = math.inf
        self.points: list[tuple[float, float]] = []

    def add(self, budget: float, loss: float, regret: float) -> None:
        self.consumed += budget
        if budget == self.max_budget and loss < self.best_loss:
            self.best_loss, self.regret = loss, regret
        self.points.append((self.consumed, self.regret))

    def regret_at(self, consumed: float) -> float:
        regret = math.inf
        for spent, value in self.points:
            if spent > consumed:
                break
            regret = value
        return regret


def run_hpo(problem: Problem, seed: int, evaluations: int, random_fraction: float) -> _Trajectory:
    sampler = BOHBSampler(
        problem.space,
        min_budget=problem.min_budget,
        max_budget=problem.max_budget,
        eta=ETA,
        random_fraction=random_fraction,
        seed=seed,
    )
    study = optuna.create_study(sampler=sampler)
    rng = np.random.default_rng([seed, 1])
    trajectory = _Trajectory(problem.max_budget)
    for _ in range(evaluations):
        trial = study.ask()
        params = suggest(trial, problem.space)
        budget = trial_budget(trial)
        assert budget is not None
        loss, regret = problem.evaluate(params, budget, rng)
        study.tell(trial, loss)
        trajectory.add(budget, loss, regret)
    return trajectory


def run_hpbandster(problem: Problem, seed: int, evaluations: int) -> _Trajectory:
    """hpbandster's BOHB, its master's loop with one worker, on the same ConfigSpace space."""
    from hpbandster.core.dispatcher import Job
    from hpbandster.optimizers import BOHB as HpBandSterBOHB
    from hpbandster.optimizers.config_generators.bohb import BOHB as KdeConfigGenerator

    codec = ConfigSpaceCodec(problem.space, seed=seed)
    np.random.seed(seed)  # hpbandster draws from NumPy's global state
    schedule = HyperbandSchedule(problem.min_budget, problem.max_budget, ETA)
    # The optimizer's constructor starts the Pyro4 master; get_next_iteration only reads these.
    optimizer = SimpleNamespace(
        max_SH_iter=schedule.max_sh_iter,
        eta=ETA,
        budgets=np.array(schedule.budgets),
        config_generator=KdeConfigGenerator(codec.configspace),
    )
    rng = np.random.default_rng([seed, 1])
    trajectory = _Trajectory(problem.max_budget)
    iterations: list[Any] = []
    while len(trajectory.points) < evaluations:
        next_run = None
        for iteration in iterations:
            if not iteration.is_finished:
                next_run = iteration.get_next_run()
                if next_run is not None:
                    break
        if next_run is None:
            iterations.append(HpBandSterBOHB.get_next_iteration(optimizer, len(iterations)))
            continue
        config_id, config, budget = next_run
        loss, regret = problem.evaluate(codec.decode(config), budget, rng)
        job = Job(config_id, config=config, budget=budget)
        job.result = {"loss": loss}
        iterations[config_id[0]].register_result(job)
        optimizer.config_generator.new_result(job)
        trajectory.add(budget, loss, regret)
    return trajectory


METHODS: dict[str, Callable[[Problem, int, int], _Trajectory]] = {
    "BOHB (hpo)": lambda problem, seed, n: run_hpo(problem, seed, n, 1 / 3),
    "BOHB (hpbandster)": run_hpbandster,
    "random+HB": lambda problem, seed, n: run_hpo(problem, seed, n, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--cycles", type=int, default=3, help="whole Hyperband cycles per run (default 3)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")  # hpbandster's reference run uses ConfigSpace's deprecated API
    # ... and logs a dump of its KDE data whenever a candidate scores NaN (hpo's sampler demotes that)
    logging.getLogger("hpbandster").setLevel(logging.ERROR)
    for name, problem in PROBLEMS.items():
        schedule = HyperbandSchedule(problem.min_budget, problem.max_budget, ETA)
        cycle = schedule.cycle()
        evaluations = args.cycles * sum(b.evaluations for b in cycle)
        total = args.cycles * sum(b.total_budget for b in cycle) / problem.max_budget
        print(
            f"\n{name}: budgets {[round(b, 3) for b in schedule.budgets]}, brackets "
            f"{[b.num_configs for b in cycle]}; {evaluations} evaluations = {total:g} R per run, "
            f"{args.seeds} seeds"
        )
        results: dict[str, list[_Trajectory]] = {}
        for method, run in METHODS.items():
            started = time.perf_counter()
            results[method] = [run(problem, seed, evaluations) for seed in range(args.seeds)]
            per_evaluation = 1000 * (time.perf_counter() - started) / (args.seeds * evaluations)
            print(f"  {method}: {per_evaluation:.1f} ms of optimiser time per evaluation")
        columns = "".join(f"{method:>19}" for method in METHODS)
        print(f"  median regret\n  {'used':>6}{columns}{'hpo / random':>14}{'hpo <= random':>15}")
        for checkpoint in (c for c in CHECKPOINTS if c <= total):
            regrets = {
                m: [t.regret_at(checkpoint * problem.max_budget) for t in runs] for m, runs in results.items()
            }
            medians = {m: statistics.median(values) for m, values in regrets.items()}
            cells = "".join(f"{medians[m]:>19.4g}" for m in METHODS)
            ours, theirs = regrets["BOHB (hpo)"], regrets["random+HB"]
            wins = sum(a <= b for a, b in zip(ours, theirs, strict=True))
            ratio = medians["BOHB (hpo)"] / medians["random+HB"] if medians["random+HB"] > 0 else math.nan
            print(f"  {checkpoint:>4} R{cells}{ratio:>14.3f}{wins:>12}/{args.seeds}")


if __name__ == "__main__":
    main()
