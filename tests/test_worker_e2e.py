"""End to end through the CLI on SQLite: the quickstart, results readable by the optuna CLI,
failures recorded without losing the worker, signals, definitions that changed, storage errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import ROOT, cli_env, run_cli, start_cli
from optuna.trial import TrialState
from studyfiles import quadratic_study

from hpo._records import trial_metrics
from hpo.studies import stored_definition


def states(storage_url: str, name: str) -> dict[str, int]:
    study = optuna.load_study(study_name=name, storage=storage_url)
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.mark.slow
def test_quickstart_runs_its_20_trials_and_the_optuna_cli_reads_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = run_cli(
        [
            "worker",
            "studies/digits_quickstart.yaml",
            "--storage",
            url,
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ]
    )
    assert result.returncode == 0, result.stderr
    finished = [line for line in result.stdout.splitlines() if line.startswith("trial ")]
    assert len(finished) == 20
    counts = states(url, "digits_quickstart")
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 20 and "WAITING" not in counts
    assert counts.get("PRUNED", 0) > 0, "median pruning should stop some of 20 trials"
    # checkpoints of finished trials are cleaned up
    assert not any((tmp_path / "ck").rglob("checkpoint.pt"))

    listed = subprocess.run(
        [
            str(Path(sys.executable).parent / "optuna"),
            "trials",
            "--study-name",
            "digits_quickstart",
            "--storage",
            url,
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    trials = json.loads(listed.stdout)
    assert len(trials) == 20 and {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}

    best = json.loads(run_cli(["best", "digits_quickstart", "--storage", url, "--json"]).stdout)
    study = optuna.load_study(study_name="digits_quickstart", storage=url)
    assert best["value"] == study.best_value and best["params"] == study.best_params
    assert (stored_definition(study) or {})["n_trials"] == 20
    # learning curves are stored per epoch
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(len(t.intermediate_values) == len(trial_metrics(t)["val_loss"]) for t in complete)

    csv_text = run_cli(["export", "digits_quickstart", "--storage", url, "--format", "csv"]).stdout
    assert csv_text.splitlines()[0].startswith("number,state,value") and len(csv_text.splitlines()) == 21
    exported = json.loads(
        run_cli(["export", "digits_quickstart", "--storage", url, "--format", "json"]).stdout
    )
    assert [t["number"] for t in exported["trials"]] == list(range(20))
    status = run_cli(["status", "digits_quickstart", "--storage", url]).stdout
    assert "study digits_quickstart: 20/20 done" in status


def test_same_seed_reproduces_the_same_trials(tmp_path: Path) -> None:
    path = quadratic_study(tmp_path, n_trials=8)
    values = []
    for run in range(2):
        url = f"sqlite:///{tmp_path / f'r{run}.db'}"
        assert run_cli(["worker", str(path), "--storage", url]).returncode == 0
        study = optuna.load_study(study_name="quad", storage=url)
        values.append([(t.params["x"], t.params["y"], t.value) for t in study.trials])
    assert values[0] == values[1]


def test_crashing_trials_are_recorded_and_the_worker_goes_on(tmp_path: Path, sqlite_url: str) -> None:
    path = quadratic_study(
        tmp_path,
        sampler="grid",
        n_trials=None,
        objective="hpo_test_objectives:crash_when_negative",
        grid_x=[-2, -1, 1, 2],
        grid_y=[0],
    )
    result = run_cli(["worker", str(path), "--storage", sqlite_url])
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="quad", storage=sqlite_url)
    by_x = {t.params["x"]: t for t in study.trials}
    assert {x for x, t in by_x.items() if t.state == TrialState.FAIL} == {-2, -1}
    assert {x for x, t in by_x.items() if t.state == TrialState.COMPLETE} == {1, 2}
    assert "simulated CUDA out of memory" in by_x[-1].system_attrs["fail_reason"]
    assert "trial 0 FAIL" in result.stdout or "trial 1 FAIL" in result.stdout


def test_consecutive_failures_stop_the_worker_with_a_message(tmp_path: Path, sqlite_url: str) -> None:
    # Each trial fails its own way: not one bug repeated (see tests/test_broken_objective.py).
    path = quadratic_study(tmp_path, n_trials=10, objective="hpo_broken_objectives:fails_differently")
    result = run_cli(["worker", str(path), "--storage", sqlite_url, "--max-consecutive-failures", "3"])
    assert result.returncode == 1
    assert "3 consecutive trials failed" in result.stdout
    counts = states(sqlite_url, "quad")
    assert counts == {"FAIL": 3, "WAITING": 7}
    study = optuna.load_study(study_name="quad", storage=sqlite_url)
    assert "failure of trial 0" in study.trials[0].system_attrs["fail_reason"]


def test_worker_n_trials_and_a_second_worker_finish_exactly_the_budget(
    tmp_path: Path, sqlite_url: str
) -> None:
    path = quadratic_study(tmp_path, n_trials=7)
    first = run_cli(["worker", str(path), "--storage", sqlite_url, "--n-trials", "3"])
    assert first.returncode == 0 and "ran its 3 trial(s)" in first.stdout
    assert states(sqlite_url, "quad") == {"COMPLETE": 3, "WAITING": 4}
    second = run_cli(["worker", "--study-name", "quad", "--storage", sqlite_url])
    assert second.returncode == 0
    assert states(sqlite_url, "quad") == {"COMPLETE": 7}
    third = run_cli(["worker", "--study-name", "quad", "--storage", sqlite_url])
    assert "no trials left" in third.stdout and states(sqlite_url, "quad") == {"COMPLETE": 7}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_records_the_running_trial_and_requeues_it(tmp_path: Path, sqlite_url: str, sig: int) -> None:
    markers = tmp_path / "markers"
    path = quadratic_study(
        tmp_path, n_trials=3, epochs=40, sleep=0.25, objective="hpo_test_objectives:marker_then_sleep"
    )
    env = cli_env({"HPO_TEST_MARKERS": str(markers)})
    worker = start_cli(["worker", str(path), "--storage", sqlite_url], env=env)
    wait_for(lambda: (markers / "trial-0.started").exists())
    time.sleep(0.6)  # mid-trial: a few epochs reported
    worker.send_signal(sig)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 128 + sig, output  # 143 for SIGTERM, 130 for SIGINT, as shells expect
    assert f"interrupted by {signal.Signals(sig).name}" in output
    study = optuna.load_study(study_name="quad", storage=sqlite_url)
    interrupted = study.trials[0]
    assert interrupted.state == TrialState.FAIL
    assert interrupted.system_attrs["fail_reason"] == f"worker interrupted by {signal.Signals(sig).name}"
    assert len(interrupted.intermediate_values) >= 1
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    requeued = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(requeued) == 1 and requeued[0].state == TrialState.WAITING
    assert requeued[0].params == interrupted.params


def test_changed_definition_is_refused_with_the_difference(tmp_path: Path, sqlite_url: str) -> None:
    path = quadratic_study(tmp_path, n_trials=2)
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    again = run_cli(["create-study", str(path), "--storage", sqlite_url])
    assert again.returncode == 2 and "--skip-if-exists" in again.stderr
    assert run_cli(["create-study", str(path), "--storage", sqlite_url, "--skip-if-exists"]).returncode == 0
    quadratic_study(tmp_path, n_trials=2, epochs=9)  # same file, budget changed
    changed = run_cli(["worker", str(path), "--storage", sqlite_url])
    assert changed.returncode == 2
    assert "different definition" in changed.stderr
    assert "-  max_epochs: 3" in changed.stderr and "+  max_epochs: 9" in changed.stderr
    assert states(sqlite_url, "quad") == {"WAITING": 2}  # nothing ran


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("not a url", "is not a database URL"),
        ("mongodb://localhost/x", "unsupported database 'mongodb'"),
        ("postgresql://nobody@127.0.0.1:1/none", "cannot open storage"),
        ("grpc://localhost", "expected grpc://HOST:PORT"),
    ],
)
def test_bad_storage_urls_give_one_line(tmp_path: Path, url: str, fragment: str) -> None:
    path = quadratic_study(tmp_path)
    result = run_cli(["create-study", str(path), "--storage", url])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_storage_comes_from_optuna_storage_env(tmp_path: Path) -> None:
    path = quadratic_study(tmp_path, n_trials=1)
    url = f"sqlite:///{tmp_path / 'env.db'}"
    result = run_cli(["worker", str(path)], env=cli_env({"OPTUNA_STORAGE": url}))
    assert result.returncode == 0, result.stderr
    assert states(url, "quad") == {"COMPLETE": 1}


def test_default_storage_is_sqlite_under_storage(tmp_path: Path) -> None:
    path = quadratic_study(tmp_path, n_trials=1)
    result = run_cli(["worker", str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "storage" / "hpo.db").is_file()


def test_missing_study_and_unknown_study_name(tmp_path: Path, sqlite_url: str) -> None:
    result = run_cli(["worker", "--study-name", "ghost", "--storage", sqlite_url])
    assert result.returncode == 2 and "no study named 'ghost'" in result.stderr
    result = run_cli(["worker", str(tmp_path / "missing.yaml"), "--storage", sqlite_url])
    assert result.returncode == 2 and "study file not found" in result.stderr
    result = run_cli(["best", "ghost", "--storage", sqlite_url])
    assert result.returncode == 2 and "no study named 'ghost'" in result.stderr


def test_help_lists_every_command() -> None:
    out = run_cli(["--help"]).stdout
    for command in ("create-study", "worker", "status", "best", "export"):
        assert command in out
    assert str(ROOT)  # the CLI runs from the repository root in these tests


@pytest.mark.parametrize("sampler", ["random", "tpe", "gp", "cmaes", "grid"])
def test_every_sampler_runs_a_study_created_by_another_process(
    tmp_path: Path, sqlite_url: str, sampler: str
) -> None:
    grid = [-1.0, 2.0] if sampler == "grid" else None
    path = quadratic_study(
        tmp_path, sampler=sampler, n_trials=None if sampler == "grid" else 4, grid_x=grid, grid_y=grid
    )
    assert run_cli(["create-study", str(path), "--storage", sqlite_url]).returncode == 0
    result = run_cli(["worker", "--study-name", "quad", "--storage", sqlite_url])
    assert result.returncode == 0, result.stdout + result.stderr
    assert states(sqlite_url, "quad") == {"COMPLETE": 4}
