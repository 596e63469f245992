"""Objectives used by the tests: trivial, deterministic and fast, importable by worker subprocesses
(``tests/support`` is put on PYTHONPATH by ``tests/conftest.py::cli_env``)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from hpo.objective import Objective, TrialRun


def quadratic(run: TrialRun) -> float:
    """(x - 2)^2 + (y + 1)^2 approached over the epochs; ``settings.sleep`` seconds per epoch."""
    config = run.config
    x = float(config.get("x", 0.0))
    y = float(config.get("y", 0.0))
    target = (x - 2.0) ** 2 + (y + 1.0) ** 2
    sleep = float(config.get("sleep", 0.0))
    for epoch in range(1, run.max_epochs + 1):
        if sleep:
            time.sleep(sleep)
        value = target + 1.0 / epoch
        if run.report(epoch, {"loss": value}):
            break
    return run.final_value()


def crash_when_negative(run: TrialRun) -> float:
    """Raises for x < 0 (a bad trial), else behaves like :func:`quadratic`."""
    if float(run.config["x"]) < 0:
        raise RuntimeError(f"simulated CUDA out of memory for x={run.config['x']}")
    return quadratic(run)


def always_nan(run: TrialRun) -> float:
    return math.nan


def marker_then_sleep(run: TrialRun) -> float:
    """Writes ``<marker_dir>/trial-<number>.started`` then trains slowly (for kill tests)."""
    marker_dir = Path(os.environ["HPO_TEST_MARKERS"])
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / f"trial-{run.number}.started").write_text(str(os.getpid()))
    return quadratic(run)


QUADRATIC = Objective(train=quadratic, description="test objective")
