"""``hpo export``: learning curves in CSV, long form (a row per trial and epoch) and wide form
(a row per trial, a JSON list per curve), from a real SQLite study trained by ``hpo worker``."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, run_cli
from studyfiles import quadratic_study

from hpo.errors import HpoError
from hpo.inspect import EXPORT_FORMATS, export

# Written into the test's folder and put on the workers' PYTHONPATH: three metrics per epoch, and a
# trial with x < 0 fails in its second epoch, after reporting it (its curve must be kept).
CURVES_OBJECTIVE = """
from hpo.objective import TrialRun


def curves(run: TrialRun) -> float:
    x = float(run.config["x"])
    for epoch in range(1, run.max_epochs + 1):
        loss = (x - 2.0) ** 2 + 1.0 / epoch
        run.report(epoch, {"loss": loss, "acc": epoch / 10, "lr": 0.1 / epoch})
        if x < 0 and epoch == 2:
            raise RuntimeError("simulated divergence")
    return run.final_value()
"""
EPOCHS = 3


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("export")
    (folder / "hpo_export_objectives.py").write_text(CURVES_OBJECTIVE)
    path = quadratic_study(
        folder,
        name="curves",
        sampler="grid",
        grid_x=[-1.0, 1.0, 2.0],
        grid_y=[0.0],
        n_trials=None,
        epochs=EPOCHS,
        objective="hpo_export_objectives:curves",
    )
    url = f"sqlite:///{folder / 'hpo.db'}"
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env["PYTHONPATH"]])
    result = run_cli(["worker", str(path), "--storage", url, "--no-progress"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return url


@pytest.fixture(scope="module")
def study(storage_url: str) -> optuna.Study:
    return optuna.load_study(study_name="curves", storage=storage_url)


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_long_csv_has_a_row_per_trial_and_epoch_with_every_metric(study: optuna.Study) -> None:
    rows = _rows(export(study, "csv-long"))
    header = list(rows[0])
    assert header == ["number", "state", "params_x", "params_y", "epoch", "loss", "acc", "lr"]
    by_trial: dict[int, list[dict[str, str]]] = {}
    for row in rows:
        by_trial.setdefault(int(row["number"]), []).append(row)
    trials = {t.number: t for t in study.trials}
    assert set(by_trial) == set(trials) and len(trials) == 3
    for number, trial_rows in by_trial.items():
        trial = trials[number]
        x = trial.params["x"]
        expected_epochs = 2 if x < 0 else EPOCHS
        assert [int(r["epoch"]) for r in trial_rows] == list(range(1, expected_epochs + 1))
        for r in trial_rows:
            epoch = int(r["epoch"])
            assert r["state"] == trial.state.name
            assert float(r["params_x"]) == x
            assert float(r["loss"]) == pytest.approx((x - 2.0) ** 2 + 1.0 / epoch)
            assert float(r["loss"]) == trial.intermediate_values[epoch]
            assert float(r["acc"]) == pytest.approx(epoch / 10)
            assert float(r["lr"]) == pytest.approx(0.1 / epoch)


def test_a_failed_trials_curve_is_exported(study: optuna.Study) -> None:
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert [t.params["x"] for t in failed] == [-1.0]
    rows = [r for r in _rows(export(study, "csv-long")) if r["state"] == "FAIL"]
    assert [(r["epoch"], r["acc"]) for r in rows] == [("1", "0.1"), ("2", "0.2")]
    wide = [r for r in _rows(export(study, "csv")) if r["state"] == "FAIL"]
    assert json.loads(wide[0]["curve_acc"]) == [0.1, 0.2]
    assert "simulated divergence" in wide[0]["fail_reason"]


def test_wide_csv_keeps_one_row_per_trial_and_adds_a_json_list_per_curve(
    storage_url: str, study: optuna.Study
) -> None:
    result = run_cli(["export", "curves", "--storage", storage_url, "--format", "csv"])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(
        "number,state,value,duration_s,datetime_start,datetime_complete,params_x,params_y,"
    )
    rows = _rows(text)
    assert len(rows) == len(study.trials)
    assert list(rows[0])[-5:] == ["fail_reason", "worker", "curve_loss", "curve_acc", "curve_lr"]
    trials = {t.number: t for t in study.trials}
    for row in rows:
        trial = trials[int(row["number"])]
        curve = json.loads(row["curve_loss"])
        assert curve == [v for _, v in sorted(trial.intermediate_values.items())]
        assert len(json.loads(row["curve_lr"])) == len(curve)


def test_a_trial_without_epochs_is_one_row_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'plain.db'}")  # no stored definition
    study.enqueue_trial({"x": 1.0})
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
    trial.report(0.5, 1)
    trial.report(0.25, 2)
    study.tell(trial, 0.25)
    study.enqueue_trial({"x": 2.0})  # WAITING: no epoch yet
    rows = _rows(export(study, "csv-long"))
    assert list(rows[0]) == ["number", "state", "params_x", "epoch", "intermediate_value"]
    assert [(r["number"], r["state"], r["epoch"], r["intermediate_value"]) for r in rows] == [
        ("0", "COMPLETE", "1", "0.5"),
        ("0", "COMPLETE", "2", "0.25"),
        ("1", "WAITING", "", ""),
    ]
    assert set(EXPORT_FORMATS) == {"csv", "csv-long", "json"}
    with pytest.raises(HpoError, match="csv-long"):
        export(study, "xlsx")


def test_long_csv_through_the_cli(storage_url: str, study: optuna.Study) -> None:
    result = run_cli(["export", "curves", "--storage", storage_url, "--format", "csv-long"])
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert len(rows) == sum(max(1, len(t.intermediate_values)) for t in study.trials)
    assert {"epoch", "loss", "acc", "lr"} <= set(rows[0])


@pytest.mark.parametrize("target", ["a folder", "missing/parent/x.csv", "/dev/full"])
def test_export_to_a_path_that_cannot_be_written_is_one_line(
    storage_url: str, tmp_path: Path, target: str
) -> None:
    output = {
        "a folder": str(tmp_path),
        "missing/parent/x.csv": str(tmp_path / "missing" / "parent" / "x.csv"),
    }
    path = output.get(target, target)
    result = run_cli(["export", "curves", "--storage", storage_url, "-o", path])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: -o {path}: cannot write it:") and "fix:" in line, line
