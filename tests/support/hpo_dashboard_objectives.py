"""An objective for the dashboard tests: several metrics per epoch, so every curve has a figure."""

from __future__ import annotations

import time

from hpo.objective import Objective, TrialRun


def _train(run: TrialRun) -> float:
    """``loss`` (the study metric) falls towards (x - 2)^2; ``train_loss`` and ``val_acc`` follow it."""
    x = float(run.config.get("x", 0.0))
    sleep = float(run.config.get("sleep", 0.0))
    for epoch in range(1, run.max_epochs + 1):
        if sleep:
            time.sleep(sleep)
        loss = (x - 2.0) ** 2 + 1.0 / epoch
        metrics = {"loss": loss, "train_loss": loss / 2, "val_acc": 1.0 / (1.0 + loss)}
        if run.report(epoch, metrics):
            break
    return run.final_value()


several_metrics = Objective(train=_train, metrics=("loss", "train_loss", "val_acc"))
