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


@pytest.mark.parametrize("command", [["status"], ["best", "quad"], ["export", "quad"]])
def test_read_only_commands_never_create_a_database(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "typo" / "hpo.db"
    result = run_cli([*command, "--storage", f"sqlite:///{missing}"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no database file" in line and str(missing) in line
    assert not missing.exists() and not missing.parent.exists()
