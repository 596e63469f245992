"""``hpo tabulate``: train a grid of configurations once, with full learning curves, into a table.

The tabulating study is the study file with ``sampler: grid``, ``pruner: none`` and
``early_stopping: none`` (every curve runs to ``budget.max_epochs``), named ``NAME/table``. It is an
ordinary study: other machines can help with ``hpo worker --study-name NAME/table``, and running
``hpo tabulate`` again continues it. ``--points-per-param K`` tabulates, for every numeric parameter,
K evenly spaced values (log-spaced for log parameters) together with its own ``grid:`` values: a
denser table than the study's grid, on which grid search still replays its own points exactly.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from hpo._records import EPOCH_SECONDS_KEY, set_trial_system_attr, trial_epoch_seconds, trial_metrics
from hpo.compare._plan import _with
from hpo.compare._replay import ReplayTable, TableEntry
from hpo.errors import HpoError
from hpo.objective import Objective, TrialRun
from hpo.space import CategoricalParam, IntParam, Param
from hpo.spec import StudySpec

# Trial user attribute: wall-clock seconds of each epoch (the first one includes the trial's setup).
EPOCH_SECONDS_ATTR = EPOCH_SECONDS_KEY  # a trial system attribute (hpo._records)


def _dense_grid(param: Param, points: int) -> list[Any] | None:
    """``points`` evenly spaced values (log-spaced for log parameters) plus the parameter's own
    ``grid:`` values, so that grid search replays its points exactly; None for categoricals."""
    if isinstance(param, CategoricalParam):
        return None
    low, high = float(param.low), float(param.high)
    values = np.geomspace(low, high, points) if param.log else np.linspace(low, high, points)
    own = list(param.grid or ())
    if isinstance(param, IntParam):
        steps = np.round((values - param.low) / param.step).astype(int)
        return sorted({int(param.low + s * param.step) for s in steps} | {int(v) for v in own})
    # interior points rounded to 6 significant digits: readable tables, same coverage
    spaced = [float(f"{v:.6g}") if 0 < i < points - 1 else float(v) for i, v in enumerate(values)]
    return sorted(set(spaced) | {float(v) for v in own})


def tabulate_spec(base: StudySpec, source: str, points_per_param: int | None = None) -> StudySpec:
    """The tabulating study for ``base`` (see the module docstring)."""
    definition = base.definition()
    space = definition["search_space"]
    if points_per_param is not None:
        if points_per_param < 2:
            raise HpoError(f"--points-per-param must be at least 2, got {points_per_param} (fix: e.g. 7)")
        for param in base.space:
            grid = _dense_grid(param, points_per_param)
            if grid is not None:
                space[param.name]["grid"] = grid
    return _with(
        definition,
        source,
        name=f"{base.name}/table",
        search_space=space,
        sampler={"name": "grid"},
        pruner={"name": "none"},
        early_stopping={"rule": "none"},
        n_trials=None,
    )


def timed(objective: Objective) -> Objective:
    """``objective`` that also records each epoch's wall-clock seconds on the trial."""

    def train(run: TrialRun) -> float:
        marks = [time.perf_counter()]
        previous = run.on_epoch

        def on_epoch(epoch: int, metrics: Any) -> None:
            marks.append(time.perf_counter())
            if previous is not None:
                previous(epoch, metrics)

        run.on_epoch = on_epoch
        try:
            return objective.train(run)
        finally:
            # one write per trial, however it ends
            seconds = [b - a for a, b in itertools.pairwise(marks)]
            set_trial_system_attr(run.trial, EPOCH_SECONDS_ATTR, seconds)

    return Objective(
        train=train, config=objective.config, data=objective.data, description=objective.description
    )


def table_from_study(study: optuna.Study, spec: StudySpec) -> ReplayTable:
    """The table of a finished tabulating study; an error naming what is left if it is unfinished."""
    trials = study.get_trials(deepcopy=False)
    left = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    if left:
        raise HpoError(
            f"study {study.study_name!r} has {len(left)} of {len(trials)} configurations left to train "
            f"(fix: run hpo tabulate again, or hpo worker --study-name {study.study_name})"
        )
    entries: dict[str, TableEntry] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        # A configuration retried after its worker died appears twice; the later attempt wins.
        if trial.state not in (TrialState.COMPLETE, TrialState.FAIL):
            continue
        # The study metric's curve is the trial's intermediate values; other metrics come from the
        # history the objective recorded, where complete.
        curve = tuple(float(trial.intermediate_values[step]) for step in sorted(trial.intermediate_values))
        epochs = len(curve)
        metrics = {spec.metric: curve}
        for name, values in trial_metrics(trial).items():
            if name != spec.metric and len(values) == epochs:
                metrics[name] = tuple(float(v) for v in values)
        seconds = trial_epoch_seconds(trial)[:epochs]
        if len(seconds) != epochs:
            # Trained by a plain `hpo worker` that does not time epochs: spread the trial's duration.
            total = 0.0
            if trial.datetime_start and trial.datetime_complete:
                total = (trial.datetime_complete - trial.datetime_start).total_seconds()
            seconds = [total / epochs] * epochs if epochs else []
        if trial.state == TrialState.COMPLETE and not epochs:
            continue
        key = repr(sorted(trial.params.items()))
        entries[key] = TableEntry(
            params=dict(trial.params),
            state=trial.state.name,
            metrics=metrics,
            epoch_seconds=tuple(seconds),
            fail_reason=None
            if trial.state == TrialState.COMPLETE
            else str(trial.system_attrs.get("fail_reason")),
        )
    if not any(e.state == "COMPLETE" for e in entries.values()):
        raise HpoError(f"study {study.study_name!r} has no completed configuration to tabulate")
    definition = spec.definition()
    return ReplayTable(
        study=study.study_name,
        definition=definition,
        metric=spec.metric,
        direction=spec.direction,
        max_epochs=spec.budget.max_epochs,
        entries=tuple(entries.values()),
        space=spec.space,
    )
