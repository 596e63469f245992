"""Runner of the other optimisers of ``benchmarks/bohb_compare.py``, each in its own environment.

Run by ``bohb_compare.py`` as ``VENV/bin/python benchmarks/_bohb_external.py`` with a JSON request
on stdin::

    {"method": "hpbandster" | "dehb" | "synetune", "problem": NAME, "seeds": [...], "budget": EPOCHS}

It writes one JSON object to stdout: ``{"trajectories": [Trajectory.to_json(), ...], "seconds": S}``.
It imports only the optimiser's own package, numpy and :mod:`_bohb_problems` (hpo is not installed
in those environments). Each run is one simulated worker that stops once the epochs trained reach
``budget``; cost is counted as in :mod:`_bohb_methods`:

* ``hpbandster`` — hpbandster 0.7.4's BOHB: its ``SuccessiveHalving`` iterations and KDE config
  generator in its master's scheduling loop with one worker (no Pyro4 name server); every
  evaluation retrains its whole budget, as hpbandster does;
* ``dehb`` — DEHB (Awad et al. 2021) through its ask/tell interface; every evaluation trains its
  whole fidelity (DEHB does not continue a configuration);
* ``synetune`` — Syne Tune's ``BOHB`` baseline (asynchronous successive halving in stopping mode
  with a KDE searcher): a trial trains epoch by epoch until the scheduler stops it, paying the
  epochs it ran.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bohb_problems import ETA, PROBLEMS, Problem, Trajectory, budget_epochs


def _configspace(problem: Problem, seed: int) -> Any:
    import ConfigSpace as CS

    space = CS.ConfigurationSpace(seed=seed % 2**31)
    hps = []
    for name, spec in problem.space.items():
        if spec["type"] == "categorical":
            hps.append(CS.CategoricalHyperparameter(name, list(spec["choices"])))
        elif spec["type"] == "int":
            hps.append(CS.UniformIntegerHyperparameter(name, int(spec["low"]), int(spec["high"])))
        else:
            log = bool(spec.get("log", False))
            hps.append(CS.UniformFloatHyperparameter(name, float(spec["low"]), float(spec["high"]), log=log))
    if hasattr(space, "add"):  # ConfigSpace >= 1.0
        space.add(hps)
    else:
        space.add_hyperparameters(hps)
    return space


def _params(config: Any) -> dict[str, Any]:
    return dict(config.get_dictionary() if hasattr(config, "get_dictionary") else config)


def run_hpbandster(problem: Problem, seed: int, budget: int) -> Trajectory:
    from hpbandster.core.dispatcher import Job
    from hpbandster.optimizers import BOHB as HpBandSterBOHB
    from hpbandster.optimizers.config_generators.bohb import BOHB as KdeConfigGenerator

    np.random.seed(seed % 2**32)  # hpbandster draws from NumPy's global state
    budgets = problem.budgets
    # The optimizer's constructor starts the Pyro4 master; get_next_iteration only reads these.
    optimizer = SimpleNamespace(
        max_SH_iter=len(budgets),
        eta=ETA,
        budgets=np.array(budgets, dtype=float),
        config_generator=KdeConfigGenerator(_configspace(problem, seed)),
    )
    trajectory = Trajectory(problem, seed)
    iterations: list[Any] = []
    while trajectory.epochs < budget:
        next_run = None
        for iteration in iterations:
            if not iteration.is_finished:
                next_run = iteration.get_next_run()
                if next_run is not None:
                    break
        if next_run is None:
            iterations.append(HpBandSterBOHB.get_next_iteration(optimizer, len(iterations)))
            continue
        config_id, config, run_budget = next_run
        epochs = budget_epochs(run_budget)
        value = problem.value(config, epochs, seed)
        job = Job(config_id, config=config, budget=run_budget)
        job.result = {"loss": value}
        iterations[config_id[0]].register_result(job)
        optimizer.config_generator.new_result(job)
        trajectory.add(config, epochs, epochs, value)
    return trajectory


def run_dehb(problem: Problem, seed: int, budget: int) -> Trajectory:
    from dehb import DEHB
    from loguru import logger

    logger.remove()  # DEHB logs every step to stderr
    with tempfile.TemporaryDirectory() as output:
        dehb = DEHB(
            cs=_configspace(problem, seed),
            min_fidelity=problem.min_budget,
            max_fidelity=problem.max_epochs,
            eta=ETA,
            n_workers=1,
            seed=seed % 2**31,
            output_path=output,
            save_freq="end",  # saved only at the end of dehb.run, which ask/tell never calls
        )
        trajectory = Trajectory(problem, seed)
        while trajectory.epochs < budget:
            job = dehb.ask()
            config = job["config"]  # a Configuration already with configspace=True (the default)
            params = _params(config if hasattr(config, "keys") else dehb.vector_to_configspace(config))
            epochs = budget_epochs(job["fidelity"])
            value = problem.value(params, epochs, seed)
            dehb.tell(job, {"fitness": value, "cost": float(epochs)})
            trajectory.add(params, epochs, epochs, value)
    return trajectory


def run_synetune(problem: Problem, seed: int, budget: int) -> Trajectory:
    import datetime

    from syne_tune import config_space as st
    from syne_tune.backend.trial_status import Trial
    from syne_tune.optimizer.baselines import BOHB
    from syne_tune.optimizer.scheduler import SchedulerDecision

    np.random.seed(seed % 2**32)  # ASHA picks brackets from NumPy's global state
    space: dict[str, Any] = {}
    for name, spec in problem.space.items():
        if spec["type"] == "categorical":
            space[name] = st.choice(list(spec["choices"]))
        elif spec["type"] == "int":
            space[name] = st.randint(int(spec["low"]), int(spec["high"]))
        elif spec.get("log"):
            space[name] = st.loguniform(float(spec["low"]), float(spec["high"]))
        else:
            space[name] = st.uniform(float(spec["low"]), float(spec["high"]))
    scheduler = BOHB(
        space,
        metric="loss",
        time_attr="epoch",
        max_t=problem.max_epochs,
        do_minimize=True,
        random_seed=seed % 2**31,
        grace_period=problem.budgets[0],
        reduction_factor=ETA,
    )
    trajectory = Trajectory(problem, seed)
    number = 0
    while trajectory.epochs < budget:
        suggestion = scheduler.suggest()
        trial = Trial(trial_id=number, config=suggestion.config, creation_time=datetime.datetime.now())
        number += 1
        scheduler.on_trial_add(trial)
        params = {name: trial.config[name] for name in problem.space}
        curve = problem.curve(params, seed)
        epoch = 0
        for epoch in range(1, problem.max_epochs + 1):
            decision = scheduler.on_trial_result(trial, {"loss": curve[epoch - 1], "epoch": epoch})
            if decision == SchedulerDecision.STOP:
                break
        scheduler.on_trial_remove(trial)
        trajectory.add(params, epoch, epoch, curve[epoch - 1])
    return trajectory


RUNNERS = {"hpbandster": run_hpbandster, "dehb": run_dehb, "synetune": run_synetune}


def main() -> None:
    request = json.load(sys.stdin)
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # hpbandster dumps its KDE data when a candidate scores NaN
    problem = PROBLEMS[request["problem"]]
    run = RUNNERS[request["method"]]
    started = time.perf_counter()
    trajectories = [run(problem, int(seed), int(request["budget"])).to_json() for seed in request["seeds"]]
    for t in trajectories:
        t["points"] = [(e, r if math.isfinite(r) else None) for e, r in t["points"]]
    json.dump({"trajectories": trajectories, "seconds": time.perf_counter() - started}, sys.stdout)


if __name__ == "__main__":
    main()
