"""Where SQLite's limit is: 4 worker processes on one SQLite file are safe; a 5th is refused.

SQLite has a single writer lock per file. With the busy timeout hpo sets, 4 processes that report
every epoch and send heartbeats every second still record every trial exactly once with no
"database is locked" error; that is the limit hpo enforces (hpo.launcher.SQLITE_MAX_WORKER_PROCESSES).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, run_cli, start_cli
from optuna.trial import TrialState
from studyfiles import quadratic_study

from hpo.launcher import SQLITE_MAX_WORKER_PROCESSES

pytestmark = pytest.mark.slow
BEAT = ["--heartbeat-interval", "1", "--grace-period", "5", "--no-progress"]


def test_four_processes_on_one_sqlite_file_record_every_trial_once(tmp_path: Path, sqlite_url: str) -> None:
    path = quadratic_study(tmp_path, n_trials=40, epochs=3)
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    workers = [
        start_cli(["worker", "--study-name", "quad", "--storage", sqlite_url, *BEAT])
        for _ in range(SQLITE_MAX_WORKER_PROCESSES)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    assert not any("locked" in out for out in outputs)
    trials = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 40}
    assert all(len(t.intermediate_values) == 3 for t in trials)


def test_a_fifth_worker_on_sqlite_is_refused_and_pointed_to_postgresql(
    tmp_path: Path, sqlite_url: str
) -> None:
    markers = tmp_path / "markers"
    path = quadratic_study(
        tmp_path, n_trials=8, epochs=60, sleep=0.25, objective="hpo_test_objectives:marker_then_sleep"
    )
    env = cli_env({"HPO_TEST_MARKERS": str(markers)})
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    workers = [
        start_cli(["worker", "--study-name", "quad", "--storage", sqlite_url, *BEAT], env=env)
        for _ in range(SQLITE_MAX_WORKER_PROCESSES)
    ]
    try:
        deadline = time.monotonic() + 180
        while len(list(markers.glob("*.started"))) < SQLITE_MAX_WORKER_PROCESSES:
            assert time.monotonic() < deadline, "the 4 workers did not all start a trial"
            time.sleep(0.2)
        fifth = run_cli(["worker", "--study-name", "quad", "--storage", sqlite_url, *BEAT], env=env)
        assert fifth.returncode == 2
        message = fifth.stderr.strip()
        assert len(message.splitlines()) == 1
        assert "exceed its safe limit of 4" in message and "already running" in message
        assert "PostgreSQL" in message
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.communicate(timeout=120)
    study = optuna.load_study(study_name="quad", storage=sqlite_url)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
