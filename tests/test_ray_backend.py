"""``hpo worker --backend ray`` on a real local Ray instance (2 CPUs), as a user runs it.

Every study is run through the CLI in a subprocess, which starts its own Ray instance and shuts it
down; the results are then read back with Optuna, ``hpo status`` and the ``optuna`` CLI. Ray is
heavy on a small machine, so the studies are a handful of trials of a fast objective.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import cli_env, run_cli, start_cli, study_if_created, write_study
from optuna.trial import FrozenTrial, TrialState

from hpo._records import trial_metrics
from hpo.ray_backend._schedulers import make_scheduler
from hpo.samplers import make_sampler, trial_seed
from hpo.space import suggest
from hpo.spec import parse_study

RAY_TIMEOUT = 420  # seconds for one CLI run: Ray starts slowly on a loaded 2-core machine


def ray_env(tmp_path: Path) -> dict[str, str]:
    env = cli_env(
        {
            # A local instance of exactly 2 CPUs whatever the machine: 2 trials at a time.
            "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2, "GPU": 0}),
            "RAY_USAGE_STATS_ENABLED": "0",
            "HPO_TEST_MARKERS": str(tmp_path / "markers"),
        }
    )
    env.pop("RAY_ADDRESS", None)  # never join a cluster the test machine may know of
    return env


def ray_processes() -> set[int]:
    """PIDs of Ray's processes (GCS, raylet, workers, monitors) on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mark in cmdline for mark in ("gcs_server", "raylet", "ray::", "default_worker.py")):
            found.add(int(entry.name))
    return found


def assert_ray_gone(before: set[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    left = ray_processes() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = ray_processes() - before
    assert not left, f"Ray processes left behind: {sorted(left)}"


def optuna_cli_trials(url: str, name: str) -> list[dict[str, object]]:
    listed = subprocess.run(
        [
            str(Path(sys.executable).parent / "optuna"),
            "trials",
            "--study-name",
            name,
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
    return list(json.loads(listed.stdout))


def assert_learning_curve(trial: FrozenTrial) -> None:
    """One intermediate value per epoch, epochs 1..n without gaps."""
    assert sorted(trial.intermediate_values) == list(range(1, len(trial.intermediate_values) + 1))


def quadratic_loss(params: dict[str, float], epoch: int) -> float:
    """What ``hpo_test_objectives:quadratic`` reports at ``epoch``."""
    return (params["x"] - 2.0) ** 2 + (params.get("y", 0.0) + 1.0) ** 2 + 1.0 / epoch


ASHA_STUDY = """
name: ray_asha
objective: hpo_test_objectives:quadratic
settings: {sleep: 0.2}
search_space:
  # Two good points first, then four bad ones. With 2 trials at a time the bad ones start only
  # after a good one has reported epoch 1, so ASHA (reduction factor 2) always stops them there.
  x: {type: float, low: -100, high: 100, grid: [2.0, 2.5, 30.0, 40.0, 50.0, 60.0]}
  y: {type: float, low: -5, high: 5, grid: [-1.0]}
metric: loss
direction: minimize
budget: {max_epochs: 8}
sampler: grid
pruner: {name: successive_halving, options: {min_resource: 1, reduction_factor: 2}}
"""


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_ray_run_records_trials_learning_curves_and_pruning_in_postgres(
    tmp_path: Path, postgres_url: str
) -> None:
    study_file = write_study(tmp_path, ASHA_STUDY)
    checkpoints = tmp_path / "ck"
    before = ray_processes()
    result = run_cli(
        [
            "worker",
            str(study_file),
            "--storage",
            postgres_url,
            "--backend",
            "ray",
            "--checkpoint-dir",
            str(checkpoints),
        ],
        env=ray_env(tmp_path),
        timeout=RAY_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_ray_gone(before)
    assert "scheduler ASHA (max_t=8, grace_period=1, reduction_factor=2" in result.stdout

    study = optuna.load_study(study_name="ray_asha", storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == 6, "exactly the queued trials, no extra ones"
    by_x = {t.params["x"]: t for t in trials}
    assert sorted(by_x) == [2.0, 2.5, 30.0, 40.0, 50.0, 60.0]
    for trial in trials:
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED), trial
        assert_learning_curve(trial)
        for epoch, value in trial.intermediate_values.items():
            assert value == pytest.approx(quadratic_loss(trial.params, epoch))
        assert str(trial.system_attrs["hpo:worker"]).endswith(":ray")
    best = by_x[2.0]  # the best point everywhere: never below ASHA's cut-off
    assert best.state == TrialState.COMPLETE and len(best.intermediate_values) == 8
    assert best.value == pytest.approx(quadratic_loss(best.params, 8))
    for x in (30.0, 40.0, 50.0, 60.0):
        assert by_x[x].state == TrialState.PRUNED and list(by_x[x].intermediate_values) == [1]
    assert study.best_trial.number == best.number
    finished_lines = [line for line in result.stdout.splitlines() if line.startswith("trial ")]
    assert len(finished_lines) == 6
    assert not [p for p in checkpoints.rglob("*") if p.is_file()], "finished trials keep no checkpoint"

    counts = {
        state: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED)
    }
    status = run_cli(["status", "ray_asha", "--storage", postgres_url])
    assert status.returncode == 0, status.stderr
    assert "study ray_asha: 6/6 done" in status.stdout
    assert f"complete={counts[TrialState.COMPLETE]}" in status.stdout
    assert f"pruned={counts[TrialState.PRUNED]}" in status.stdout
    assert f"best: trial {best.number} value=0.125" in status.stdout

    listed = optuna_cli_trials(postgres_url, "ray_asha")
    assert {(t["number"], t["state"]) for t in listed} == {(t.number, t.state.name) for t in trials}


CRASH_STUDY = """
name: ray_crash
objective: hpo_ray_objectives:crash_once
search_space:
  x: {type: float, low: -10, high: 10}
metric: loss
direction: minimize
n_trials: 2
budget: {max_epochs: 4}
sampler: {name: tpe, seed: 3, options: {n_startup_trials: 2}}
"""


def plain_worker_draw(study_text: str, number: int) -> dict[str, object]:
    """The parameters a plain worker samples for trial ``number`` of an empty study (TPE startup)."""
    spec = parse_study(yaml.safe_load(study_text), "test")
    study = optuna.create_study(sampler=make_sampler(spec, seed=trial_seed(spec.sampler_seed, number)))
    return dict(suggest(study.ask(), spec.space))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_restores_a_trial_whose_process_died_from_its_checkpoint(tmp_path: Path, sqlite_url: str) -> None:
    study_file = write_study(tmp_path, CRASH_STUDY)
    checkpoints = tmp_path / "ck"
    before = ray_processes()
    result = run_cli(
        [
            "worker",
            str(study_file),
            "--storage",
            sqlite_url,
            "--backend",
            "ray",
            "--checkpoint-dir",
            str(checkpoints),
            "--max-retry",
            "2",
        ],
        cwd=tmp_path,
        env=ray_env(tmp_path),
        timeout=RAY_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_ray_gone(before)
    study = optuna.load_study(study_name="ray_crash", storage=sqlite_url)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:
        # the study's sampler, seeded per trial number exactly as plain workers seed it
        assert trial.params == plain_worker_draw(CRASH_STUDY, trial.number)
    for trial in trials:
        # the first attempt killed its own process after epoch 2 ...
        assert (tmp_path / "markers" / f"crash-{trial.number}").is_file()
        # ... and Ray restored it from the checkpoint it had reported, instead of starting over
        assert trial.user_attrs["resumed_from_epoch"] >= 1
        assert sorted(trial.intermediate_values) == [1, 2, 3, 4]
        # every epoch's metrics are stored with the trial, each epoch once despite the restore
        losses = [trial.intermediate_values[epoch] for epoch in (1, 2, 3, 4)]
        assert trial_metrics(trial) == {"loss": losses, "train_loss": [v / 2 for v in losses]}
        assert trial.value == pytest.approx((trial.params["x"] - 2.0) ** 2 + 1.0 + 1.0 / 4)
        # trials run in the directory hpo was started from, as with plain workers
        assert trial.user_attrs["cwd"] == str(tmp_path)
    assert not [p for p in checkpoints.rglob("*") if p.is_file()]


SLOW_STUDY = """
name: ray_stop
objective: hpo_test_objectives:quadratic
settings: {sleep: 2.0}
search_space:
  x: {type: float, low: -5, high: 5, grid: [2.0, 2.5, 3.0]}
metric: loss
direction: minimize
budget: {max_epochs: 6}
sampler: grid
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_hands_the_trials_back_to_the_queue(tmp_path: Path, sqlite_url: str) -> None:
    study_file = write_study(tmp_path, SLOW_STUDY)
    before = ray_processes()
    worker = start_cli(
        [
            "worker",
            str(study_file),
            "--storage",
            sqlite_url,
            "--backend",
            "ray",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ],
        env=ray_env(tmp_path),
    )
    try:
        deadline = time.monotonic() + RAY_TIMEOUT
        trained: list[FrozenTrial] = []
        while not trained and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(1.0)
            study = study_if_created(sqlite_url, "ray_stop")
            trained = [t for t in study.get_trials() if t.intermediate_values] if study else []
        if not trained and worker.poll() is not None:  # say why the worker ended
            raise AssertionError(f"the worker exited {worker.returncode}: {worker.communicate()[0]}")
        assert trained, "no trial reported an epoch"
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=180)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 130, output
    assert "Ray run stopped: interrupted" in output
    assert_ray_gone(before)

    trials = optuna.load_study(study_name="ray_stop", storage=sqlite_url).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING], "nothing may stay RUNNING"
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed, "the trial that was training is recorded as interrupted"
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    for trial in failed:
        assert "interrupted" in trial.system_attrs["fail_reason"]
        retries = [t for t in waiting if t.system_attrs.get("failed_trial") == trial.number]
        assert len(retries) == 1 and retries[0].params == trial.params, "re-queued with its parameters"
    # every grid point is still to be run, exactly once: as a retry or as its untouched slot
    pending_points = sorted(
        t.params.get("x", t.system_attrs.get("fixed_params", {}).get("x", math.nan)) for t in waiting
    )
    done_points = sorted(t.params["x"] for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED))
    assert sorted(pending_points + done_points) == [2.0, 2.5, 3.0]


@pytest.mark.parametrize(
    ("pruner", "label"),
    [
        ("{name: none}", "FIFO (no early stopping)"),
        (
            "{name: successive_halving, options: {min_resource: 1, reduction_factor: 3}}",
            "ASHA (max_t=27, grace_period=1, reduction_factor=3, brackets=1)",
        ),
        # Optuna's HyperbandPruner(1, 27, 3) runs floor(log3(27)) + 1 = 4 brackets.
        ("{name: hyperband, options: {reduction_factor: 3}}", "brackets=4"),
        (
            "{name: median, options: {n_startup_trials: 4, n_warmup_steps: 2}}",
            "median stopping rule (grace_period=2, min_samples_required=4)",
        ),
    ],
)
def test_each_supported_pruner_maps_to_its_ray_scheduler(pruner: str, label: str) -> None:
    spec = parse_study(
        {
            "name": "s",
            "objective": "hpo_test_objectives:quadratic",
            "search_space": {"x": {"type": "float", "low": 0, "high": 1}},
            "metric": "loss",
            "direction": "minimize",
            "n_trials": 3,
            "budget": {"max_epochs": 27},
            "sampler": "random",
            "pruner": yaml.safe_load(pruner),
        },
        "test",
    )
    plan = make_scheduler(spec)
    assert label in plan.name
    assert plan.ignored_options == ()


def test_pruner_without_a_ray_scheduler_is_one_clear_line(tmp_path: Path, sqlite_url: str) -> None:
    study_file = write_study(
        tmp_path,
        ASHA_STUDY.replace(
            "pruner: {name: successive_halving, options: {min_resource: 1, reduction_factor: 2}}",
            "pruner: {name: patient, options: {patience: 2}, wrapped: {name: median}}",
        ),
    )
    before = ray_processes()
    result = run_cli(
        ["worker", str(study_file), "--storage", sqlite_url, "--backend", "ray"], env=ray_env(tmp_path)
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "pruner 'patient' has no Ray Tune scheduler" in result.stderr and "fix:" in result.stderr
    assert ray_processes() - before == set(), "nothing was started"
    trials = optuna.load_study(study_name="ray_asha", storage=sqlite_url).get_trials()
    assert {t.state for t in trials} == {TrialState.WAITING}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--gpus-per-trial", "1.5"],
            "error: --gpus-per-trial 1.5: Ray grants a fraction of one GPU or whole GPUs",
        ),
        (["--address", "127.0.0.1:1"], "error: cannot reach the Ray cluster at 127.0.0.1:1"),
        (
            ["--address", "ray://head:10001"],
            "error: --address ray://head:10001: Ray Client addresses are not",
        ),
    ],
)
def test_bad_ray_flags_are_one_clear_line(
    tmp_path: Path, sqlite_url: str, flags: list[str], message: str
) -> None:
    study_file = write_study(tmp_path, ASHA_STUDY)
    before = ray_processes()
    result = run_cli(
        ["worker", str(study_file), "--storage", sqlite_url, "--backend", "ray", *flags],
        env=ray_env(tmp_path),
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and "fix:" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert ray_processes() - before == set(), "nothing was started"
