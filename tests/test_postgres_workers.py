"""Many workers on one study in a real PostgreSQL: every trial exactly once, crashes recovered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, run_cli, start_cli
from optuna.trial import TrialState
from studyfiles import quadratic_study

from hpo._rdb import WORKER_ATTR
from hpo.studies import stored_definition

pytestmark = pytest.mark.postgres


def run_workers(
    n: int, args: list[str], env: dict[str, str] | None = None, timeout: float = 240
) -> list[str]:
    workers = [start_cli(args, env=env) for _ in range(n)]
    outputs = []
    for worker in workers:
        out, _ = worker.communicate(timeout=timeout)
        assert worker.returncode == 0, out
        outputs.append(out)
    return outputs


def test_four_workers_run_each_of_24_grid_points_once(tmp_path: Path, postgres_url: str) -> None:
    path = quadratic_study(
        tmp_path,
        sampler="grid",
        n_trials=None,
        epochs=2,
        sleep=0.05,
        grid_x=[-3, -1, 0, 1, 2, 4],
        grid_y=[-2, -1, 0, 3],
    )
    assert run_cli(["create-study", str(path), "--storage", postgres_url]).returncode == 0
    outputs = run_workers(4, ["worker", "--study-name", "quad", "--storage", postgres_url, "--no-progress"])
    study = optuna.load_study(study_name="quad", storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == 24 and all(t.state == TrialState.COMPLETE for t in trials)
    points = Counter((t.params["x"], t.params["y"]) for t in trials)
    assert len(points) == 24 and set(points.values()) == {1}
    workers = {t.system_attrs[WORKER_ATTR] for t in trials}
    assert len(workers) >= 2, f"the work should be shared, got {workers}"
    assert sum(out.count("COMPLETE") for out in outputs) == 24


def test_three_workers_stop_at_exactly_n_trials(tmp_path: Path, postgres_url: str) -> None:
    path = quadratic_study(tmp_path, sampler="tpe", n_trials=30, epochs=2)
    # every worker is given the study file, as users on several machines would do
    run_workers(3, ["worker", str(path), "--storage", postgres_url, "--no-progress"])
    study = optuna.load_study(study_name="quad", storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == 30
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 30}
    # distinct configurations: per-trial seeds keep parallel workers from drawing the same point
    assert len({(t.params["x"], t.params["y"]) for t in trials}) == 30


def test_killed_worker_trial_is_failed_after_grace_and_retried(tmp_path: Path, postgres_url: str) -> None:
    markers = tmp_path / "markers"
    path = quadratic_study(
        tmp_path, n_trials=4, epochs=10, sleep=0.3, objective="hpo_test_objectives:marker_then_sleep"
    )
    env = cli_env({"HPO_TEST_MARKERS": str(markers)})
    beat = ["--heartbeat-interval", "1", "--grace-period", "3", "--no-progress"]
    victim = start_cli(["worker", str(path), "--storage", postgres_url, *beat], env=env)
    deadline = time.monotonic() + 90
    while not (markers / "trial-0.started").exists():
        assert time.monotonic() < deadline and victim.poll() is None, "worker did not start a trial"
        time.sleep(0.1)
    time.sleep(1.0)  # a few epochs into trial 0
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    study = optuna.load_study(study_name="quad", storage=postgres_url)
    assert study.trials[0].state == TrialState.RUNNING  # nobody recorded anything: the worker is gone

    (survivor_out,) = run_workers(
        1, ["worker", "--study-name", "quad", "--storage", postgres_url, *beat], env=env
    )
    study = optuna.load_study(study_name="quad", storage=postgres_url)
    trials = study.get_trials()
    killed = trials[0]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4, survivor_out
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def _optuna_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "optuna"), *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )


def test_optuna_create_study_is_adopted_with_spec_and_listed_by_optuna(
    tmp_path: Path, postgres_url: str
) -> None:
    made = _optuna_cli(
        "create-study", "--study-name", "plain", "--storage", postgres_url, "--direction", "minimize"
    )
    assert made.returncode == 0, made.stderr
    path = quadratic_study(tmp_path, n_trials=5, epochs=2)
    no_spec = run_cli(["worker", "--study-name", "plain", "--storage", postgres_url])
    assert no_spec.returncode == 2 and "--spec" in no_spec.stderr

    adopted = run_cli(["worker", "--study-name", "plain", "--spec", str(path), "--storage", postgres_url])
    assert adopted.returncode == 0, adopted.stderr
    study = optuna.load_study(study_name="plain", storage=postgres_url)
    assert (stored_definition(study) or {})["objective"] == "hpo_test_objectives:quadratic"
    assert Counter(t.state for t in study.trials) == {TrialState.COMPLETE: 5}

    listed = _optuna_cli("trials", "--study-name", "plain", "--storage", postgres_url, "-f", "json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 5 and all("x" in row["params"] for row in rows)
    # and a later worker needs only the name and the storage
    again = run_cli(["worker", "--study-name", "plain", "--storage", postgres_url])
    assert again.returncode == 0 and "no trials left" in again.stdout


def test_adopting_a_study_of_the_other_direction_is_refused(tmp_path: Path, postgres_url: str) -> None:
    made = _optuna_cli(
        "create-study", "--study-name", "up", "--storage", postgres_url, "--direction", "maximize"
    )
    assert made.returncode == 0, made.stderr
    path = quadratic_study(tmp_path, n_trials=2)
    result = run_cli(["worker", "--study-name", "up", "--spec", str(path), "--storage", postgres_url])
    assert result.returncode == 2
    assert "created to maximize but the study file says direction: minimize" in result.stderr


def test_concurrent_create_study_queues_the_budget_once(tmp_path: Path, postgres_url: str) -> None:
    path = quadratic_study(tmp_path, n_trials=6)
    procs = [
        start_cli(["create-study", str(path), "--storage", postgres_url, "--skip-if-exists"])
        for _ in range(3)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    study = optuna.load_study(study_name="quad", storage=postgres_url)
    assert len(study.trials) == 6 and all(t.state == TrialState.WAITING for t in study.trials)


def test_status_shows_running_trials_and_their_workers(tmp_path: Path, postgres_url: str) -> None:
    markers = tmp_path / "markers"
    path = quadratic_study(
        tmp_path, n_trials=2, epochs=30, sleep=0.2, objective="hpo_test_objectives:marker_then_sleep"
    )
    env = cli_env({"HPO_TEST_MARKERS": str(markers)})
    worker = start_cli(["worker", str(path), "--storage", postgres_url, "--no-progress"], env=env)
    try:
        deadline = time.monotonic() + 90
        while not (markers / "trial-0.started").exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status = run_cli(["status", "quad", "--storage", postgres_url])
        assert status.returncode == 0, status.stderr
        assert "running=1" in status.stdout and "running trials" in status.stdout
        assert f":{worker.pid}" in status.stdout  # host:pid of the worker holding the trial
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
