"""Objectives that fail on purpose, for the tests of a worker's first failures
(:mod:`hpo._first_failures`)."""

from __future__ import annotations

import os
from pathlib import Path

from hpo_test_objectives import quadratic

from hpo.objective import TrialRun


def broken_until_fixed(run: TrialRun) -> float:
    """A bug in every trial (ZeroDivisionError at the same line) until the file named by
    ``$HPO_TEST_FIXED`` exists; then :func:`quadratic`."""
    if not Path(os.environ["HPO_TEST_FIXED"]).exists():
        run.report(1, {"loss": 10.0})
        return 1 / 0
    return quadratic(run)


def first_trial_poisoned(run: TrialRun) -> float:
    """Trial 0's configuration always crashes; every other one trains like :func:`quadratic`."""
    if run.number == 0:
        raise ValueError("this configuration always crashes")
    return quadratic(run)


def fails_differently(run: TrialRun) -> float:
    """Every trial fails, each with its own message (not one bug repeated)."""
    raise RuntimeError(f"failure of trial {run.number} at x={run.config['x']}")
