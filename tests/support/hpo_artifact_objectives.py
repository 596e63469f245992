"""A test objective that stores a file with each trial as an artifact (for the dashboard tests;
``tests/support`` is put on PYTHONPATH by ``tests/conftest.py::cli_env``)."""

from __future__ import annotations

from hpo_test_objectives import quadratic

from hpo.objective import TrialRun


def quadratic_with_report(run: TrialRun) -> float:
    """:func:`quadratic`, then uploads ``report.txt`` naming the trial and its final value."""
    value = quadratic(run)
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    report = run.checkpoint_dir / "report.txt"
    report.write_text(f"trial {run.number} x={run.config['x']} y={run.config['y']} value={value}\n")
    run.upload_artifact(report)
    return value
