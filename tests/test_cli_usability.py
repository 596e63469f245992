"""The command line as a newcomer types it: mistyped flags and commands, mistyped database paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [
        (["worker", "--n-trial", "3"], "did you mean --n-trials?"),  # a prefix is not accepted silently
        (["worker", "--ntrials", "3"], "did you mean --n-trials?"),
        (["wroker"], "did you mean worker?"),
        (["status", "--storge", "sqlite:///x.db"], "did you mean --storage?"),
    ],
)
def test_mistyped_flags_and_commands_get_a_suggestion(args: list[str], suggestion: str) -> None:
    result = run_cli(args)
    assert result.returncode == 2
    assert suggestion in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.parametrize("command", [["status"], ["best", "quad"], ["export", "quad"], ["report", "quad"]])
def test_read_only_commands_never_create_a_database(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "typo" / "hpo.db"
    result = run_cli([*command, "--storage", f"sqlite:///{missing}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no database file" in line and str(missing) in line
    assert not missing.exists() and not missing.parent.exists()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--storage-patience", "0"], "--storage-patience must be a positive number"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--allow-objective", "evil.mod:obj"], "contains ':'"),
    ],
)
def test_bad_worker_flags_are_one_clear_line(tmp_path: Path, flags: list[str], fragment: str) -> None:
    from studyfiles import quadratic_study

    path = quadratic_study(tmp_path)
    result = run_cli(["worker", str(path), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}", *flags])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert fragment in line, line


def test_a_non_positive_trial_timeout_is_refused_at_load(tmp_path: Path) -> None:
    from studyfiles import quadratic_study

    path = quadratic_study(tmp_path)
    path.write_text(
        path.read_text().replace("budget: {max_epochs: 3}", "budget: {max_epochs: 3, trial_timeout: -5}")
    )
    result = run_cli(["create-study", str(path), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "budget.trial_timeout" in line, line
