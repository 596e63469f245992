"""Multi-fidelity test functions for BOHB (tests and ``benchmarks/bohb_vs_random.py``).

Branin is the multi-fidelity version of Kandasamy et al. (2017, "Multi-fidelity Bayesian
optimisation with continuous approximations", BOCA): a fidelity ``z`` in [0, 1] perturbs the
coefficients, and ``z = 1`` is the standard function. Here ``z = budget / max_budget``.
"""

from __future__ import annotations

import math
import time

from hpo.objective import TrialRun

BRANIN_MINIMUM = 0.397887357729738


def branin(x1: float, x2: float, z: float = 1.0) -> float:
    """Branin on x1 in [-5, 10], x2 in [0, 15] at fidelity ``z`` (minimum 0.3979 at z = 1)."""
    b = 5.1 / (4 * math.pi**2) - 0.01 * (1 - z)
    c = 5 / math.pi - 0.1 * (1 - z)
    t = 1 / (8 * math.pi) + 0.05 * (1 - z)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def bowl(x: float, y: float, z: float = 1.0) -> float:
    """A unimodal bowl on [-5, 5]^2 with its minimum 0 at (2, -1); low fidelity adds a tilt."""
    return (x - 2) ** 2 + (y + 1) ** 2 + 2 * (1 - z) * abs(x)


def branin_epochs(run: TrialRun) -> float:
    """Branin of params ``x``, ``y`` at fidelity epoch / budget.max_epochs, reported every epoch.

    ``settings.sleep`` seconds per epoch; the trial's value is its last epoch's (so a trial that
    BOHB gives 3 epochs scores the fidelity-3 value).
    """
    sleep = float(run.config.get("sleep", 0.0))
    x, y = float(run.config["x"]), float(run.config["y"])
    for epoch in range(1, run.max_epochs + 1):
        if sleep:
            time.sleep(sleep)
        if run.report(epoch, {"loss": branin(x, y, epoch / run.spec.budget.max_epochs)}):
            break
    return run.final_value()
