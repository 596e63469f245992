"""The optimisers of ``benchmarks/bohb_compare.py`` that run in hpo's own environment.

Each ``run_*`` function drives one optimiser with one simulated worker on a problem of
:mod:`_bohb_problems` until the epochs it has trained reach ``budget`` (the evaluation that crosses
it finishes), and returns the run's :class:`~_bohb_problems.Trajectory`. Cost is counted in epochs
actually trained:

* hpo BOHB retraining (``continuation=False``): every evaluation trains its whole budget;
* hpo BOHB with continuation: a promoted trial (``hpo:continue_from`` set by the sampler) trains
  only the epochs between its parent's budget and its own (it re-records its parent's epochs, as
  hpo's worker re-records the checkpoint's metric history);
* TPE + Optuna's HyperbandPruner: a trial trains epoch by epoch until pruned, paying the epochs it ran;
* random search: every trial trains the full budget.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import optuna
from _bohb_problems import ETA, Problem, Trajectory, sample_random

from hpo._continuation import CONTINUE_FROM_ATTR
from hpo.bohb import BOHBSampler, budget_epochs, trial_budget
from hpo.space import parse_space, suggest


def quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("hpo.bohb").setLevel(logging.ERROR)


def run_hpo(
    problem: Problem,
    seed: int,
    budget: int,
    *,
    continuation: bool,
    evidence: str,
    constant_liar: bool = True,
    evaluations: int | None = None,
) -> Trajectory:
    """hpo's BOHBSampler, hpbandster's endless plan (no ``n_trials``), one worker; stops early after
    ``evaluations`` evaluations if given."""
    space = parse_space(dict(problem.space), problem.name)
    sampler = BOHBSampler(
        space,
        min_budget=problem.min_budget,
        max_budget=problem.max_epochs,
        eta=ETA,
        seed=seed,
        evidence=evidence,  # type: ignore[arg-type]
        continuation=continuation,
        constant_liar=constant_liar,
    )
    study = optuna.create_study(sampler=sampler)
    trajectory = Trajectory(problem, seed)
    reached: dict[int, int] = {}  # trial number -> epochs its checkpoint holds
    while trajectory.epochs < budget and trajectory.evaluations != evaluations:
        trial = study.ask()
        params: dict[str, Any] = suggest(trial, space)
        slot_budget = trial_budget(trial)
        epochs = budget_epochs(slot_budget if slot_budget is not None else problem.max_epochs)
        parent = study._storage.get_trial_system_attrs(trial._trial_id).get(CONTINUE_FROM_ATTR)
        start = reached[parent] if isinstance(parent, int) else 0
        curve = problem.curve(params, seed)
        for epoch in range(1, epochs + 1):
            trial.report(curve[epoch - 1], epoch)
        study.tell(trial, curve[epochs - 1])
        trajectory.add(params, epochs - start, epochs, curve[epochs - 1])
        reached[trial.number] = epochs
    return trajectory


def run_tpe_hyperband(problem: Problem, seed: int, budget: int) -> Trajectory:
    """Optuna's TPESampler (defaults) with its HyperbandPruner over the problem's budgets."""
    space = parse_space(dict(problem.space), problem.name)
    pruner = optuna.pruners.HyperbandPruner(
        min_resource=problem.budgets[0], max_resource=problem.max_epochs, reduction_factor=ETA
    )
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner)
    trajectory = Trajectory(problem, seed)
    while trajectory.epochs < budget:
        trial = study.ask()
        params: dict[str, Any] = suggest(trial, space)
        curve = problem.curve(params, seed)
        for epoch in range(1, problem.max_epochs + 1):
            trial.report(curve[epoch - 1], epoch)
            if epoch < problem.max_epochs and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                trajectory.add(params, epoch, epoch, curve[epoch - 1])
                break
        else:
            study.tell(trial, curve[-1])
            trajectory.add(params, problem.max_epochs, problem.max_epochs, curve[-1])
    return trajectory


def run_random(problem: Problem, seed: int, budget: int) -> Trajectory:
    """Plain random search: every configuration trained for the full budget."""
    rng = np.random.default_rng([seed % 2**32, 7])
    trajectory = Trajectory(problem, seed)
    while trajectory.epochs < budget:
        params = sample_random(problem.space, rng)
        value = problem.value(params, problem.max_epochs, seed)
        trajectory.add(params, problem.max_epochs, problem.max_epochs, value)
    return trajectory


def run_local(method: str, problem: Problem, seed: int, budget: int) -> Trajectory:
    """``method`` one of :data:`LOCAL_METHODS`."""
    if method == "hpo-paper":
        return run_hpo(problem, seed, budget, continuation=False, evidence="paper")
    if method == "hpo-continuation":
        return run_hpo(problem, seed, budget, continuation=True, evidence="every_epoch")
    if method == "tpe-hyperband":
        return run_tpe_hyperband(problem, seed, budget)
    if method == "random":
        return run_random(problem, seed, budget)
    raise ValueError(f"unknown method {method!r}")


LOCAL_METHODS = ("hpo-continuation", "hpo-paper", "tpe-hyperband", "random")
