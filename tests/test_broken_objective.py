"""A worker whose first trials fail with the same error stops, and those trials are re-queued
instead of spending the study's budget (hpo._first_failures); a single poison configuration
still fails for good while the worker goes on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, run_cli
from optuna.trial import TrialState
from studyfiles import quadratic_study

from hpo._first_failures import FirstFailures, TrialError, requeue_failed
from hpo._rdb import RETRY_OF_ATTR
from hpo.storage import open_storage

TRACEBACK = """Traceback (most recent call last):
  File "/x/hpo/trainer.py", line 218, in _run
    value = float(objective.train(run))
  File "/p/myproj/model.py", line {line}, in train
    return 1 / 0
ZeroDivisionError: division by zero
"""


def error(
    message: str = "division by zero", line: int = 6, exc_type: str = "ZeroDivisionError"
) -> TrialError:
    return TrialError(exc_type, message, TRACEBACK.format(line=line))


def test_the_error_location_is_the_innermost_frame() -> None:
    assert error().where == "/p/myproj/model.py:6 in train"
    assert TrialError("E", "m", "").where == ""


def test_two_first_trials_failing_alike_make_the_objective_look_broken() -> None:
    watch = FirstFailures()
    assert not watch.failed(10, 0, error())
    assert not watch.ended(10)
    assert watch.failed(11, 1, error())
    assert watch.ended(11)
    message = watch.stop_message()
    assert message.startswith("the objective looks broken: the first 2 trials of this worker (0, 1)")
    assert "ZeroDivisionError: division by zero at /p/myproj/model.py:6 in train" in message
    assert "re-queued" in message and "(fix: correct the objective" in message and "\n" not in message


def test_a_fused_groups_alike_failures_each_end_the_streak_once(sqlite_url: str) -> None:
    # A fused group's four members fail alike and are told one after another before the worker
    # stops: every one is re-queued exactly once, and the worker stops after the last.
    study = optuna.create_study(study_name="g", storage=open_storage(sqlite_url))
    watch = FirstFailures()
    group = [study.ask() for _ in range(4)]  # claimed together, as a fused group is
    ids = [trial._trial_id for trial in group]
    for number, (trial, trial_id) in enumerate(zip(group, ids, strict=True)):
        if watch.failed(trial_id, number, error()):
            watch.requeue_earlier(study, "broken", max_retry=3)
            study.tell(trial, state=TrialState.FAIL)
            requeue_failed(study, trial_id, "broken", max_retry=3)  # as record_failure(retry=True)
        else:
            study.tell(trial, state=TrialState.FAIL)
    assert [watch.ended(trial_id) for trial_id in ids] == [False, False, False, True]
    retries = Counter(
        t.system_attrs.get(RETRY_OF_ATTR) for t in study.get_trials() if t.state == TrialState.WAITING
    )
    assert retries == {0: 1, 1: 1, 2: 1, 3: 1}
    assert "the first 4 trials of this worker (0, 1, 2, 3)" in watch.stop_message()


@pytest.mark.parametrize(
    "second",
    [
        error(line=7),  # another place
        error(message="float division by zero"),  # another message
        error(exc_type="ValueError"),  # another type
    ],
)
def test_different_errors_are_failing_trials_not_a_broken_objective(second: TrialError) -> None:
    watch = FirstFailures()
    assert not watch.failed(10, 0, error())
    watch.ended(10)
    assert not watch.failed(11, 1, second)
    assert not watch.ended(11)
    assert not watch.failed(12, 2, error()) and not watch.ended(12)  # disarmed for good


def test_a_trial_that_ends_otherwise_disarms_the_rule() -> None:
    watch = FirstFailures()
    assert not watch.failed(10, 0, error())
    watch.ended(10)
    assert not watch.ended(11)  # trial 11 completed (or was pruned, or its trainer died)
    assert not watch.failed(12, 2, error()) and not watch.ended(12)
    assert not watch.failed(13, 3, error()) and not watch.ended(13)


def _worker(path: Path, url: str, tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    result = run_cli(
        ["worker", str(path), "--storage", url, "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress"],
        env=env,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_a_broken_objective_stops_after_two_trials_and_spends_none_of_the_budget(
    tmp_path: Path, sqlite_url: str
) -> None:
    fixed = tmp_path / "FIXED"
    env = cli_env({"HPO_TEST_FIXED": str(fixed)})
    path = quadratic_study(
        tmp_path, n_trials=5, epochs=2, objective="hpo_broken_objectives:broken_until_fixed"
    )

    code, output = _worker(path, sqlite_url, tmp_path, env)
    assert code == 1, output
    trial_lines = [line for line in output.splitlines() if line.startswith("trial ")]
    assert len(trial_lines) == 2 and all(" FAIL " in line for line in trial_lines), output
    assert output.count("Traceback (most recent call last)") == 1, output  # shown once
    (stop,) = [line for line in output.splitlines() if "stopped:" in line]
    assert (
        "the objective looks broken: the first 2 trials of this worker (0, 1) failed with the same error"
        in stop
    )
    assert "ZeroDivisionError: division by zero at " in stop and "hpo_broken_objectives.py" in stop
    assert "do not count toward n_trials" in stop and "(fix: correct the objective" in stop

    study = optuna.load_study(study_name="quad", storage=sqlite_url)
    trials = study.get_trials()
    assert Counter(t.state for t in trials) == {TrialState.FAIL: 2, TrialState.WAITING: 5}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for trial in failed:  # each keeps its cause, traceback and curve; a retry replaces it
        assert "ZeroDivisionError" in trial.system_attrs["fail_reason"]
        assert "the objective looks broken" in trial.system_attrs["fail_reason"]
        assert "1 / 0" in trial.system_attrs["hpo:traceback"]
        assert trial.intermediate_values == {1: 10.0}
    retries = {t.system_attrs.get(RETRY_OF_ATTR) for t in trials if t.state == TrialState.WAITING}
    assert {t.number for t in failed} <= retries

    fixed.write_text("")  # the user fixes the objective and runs the worker again
    code, output = _worker(path, sqlite_url, tmp_path, env)
    assert code == 0, output
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 5, TrialState.FAIL: 2}
    # the re-queued configurations were the first to run, with their parameters
    for trial in failed:
        (retry,) = [t for t in trials if t.system_attrs.get(RETRY_OF_ATTR) == trial.number]
        assert retry.state == TrialState.COMPLETE and retry.params == trial.params


@pytest.mark.slow
def test_a_poison_first_trial_fails_for_good_and_the_worker_finishes_the_rest(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = quadratic_study(
        tmp_path, n_trials=4, epochs=2, objective="hpo_broken_objectives:first_trial_poisoned"
    )
    code, output = _worker(path, sqlite_url, tmp_path, cli_env())
    assert code == 0, output
    assert "looks broken" not in output
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in trials) == {TrialState.FAIL: 1, TrialState.COMPLETE: 3}
    (poison,) = [t for t in trials if t.state == TrialState.FAIL]
    assert poison.number == 0 and poison.system_attrs["fail_reason"] == (
        "ValueError: this configuration always crashes"
    )
    assert not [t for t in trials if t.system_attrs.get(RETRY_OF_ATTR) is not None]  # not re-queued
