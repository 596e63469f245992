"""An objective with two conflicting metrics, for multi-objective (Pareto front) tests."""

from __future__ import annotations

from hpo.objective import Objective, TrialRun


def _train(run: TrialRun) -> float:
    """``left`` = x^2 and ``right`` = (x - 2)^2, each epoch: minimising both trades one against the
    other for 0 <= x <= 2, so a study's Pareto front has several trials."""
    x = float(run.config.get("x", 0.0))
    for epoch in range(1, run.max_epochs + 1):
        if run.report(epoch, {"left": x**2, "right": (x - 2.0) ** 2}):
            break
    return run.final_value()


two_metrics = Objective(train=_train, metrics=("left", "right"))
