"""Objectives declare the metrics they report; a study's ``metric:`` outside them is refused when
the study file is loaded, before anything is created or trained."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import run_cli, write_study
from studyfiles import quadratic_study

from hpo.errors import SpecError
from hpo.objective import TrialRun
from hpo.spec import load_study_file, parse_study
from objectives.digits import DIGITS_MLP
from objectives.digits import train as digits_train
from objectives.vision.train import IMAGE_CLASSIFIER

DIGITS_STUDY = """\
name: digits_typo
objective: digits_mlp
data: {{val_fraction: 0.2, subset: 0.2}}
settings: {{hidden_units: 8}}
search_space:
  lr: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}}
metric: {metric}
direction: {direction}
n_trials: 2
budget: {{max_epochs: 1}}
sampler: {{name: random, seed: 0}}
"""


def test_a_misspelt_metric_is_refused_by_create_study_and_nothing_is_created(tmp_path: Path) -> None:
    path = write_study(tmp_path, DIGITS_STUDY.format(metric="val_los", direction="minimize"))
    db = tmp_path / "hpo.db"
    result = run_cli(["create-study", str(path), "--storage", f"sqlite:///{db}"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: metric: 'val_los' is not a metric this objective reports")
    assert "(fix: did you mean val_loss? declared metrics: val_loss, val_acc, train_loss)" in lines[0]
    assert "Traceback" not in result.stderr
    # nothing created: no database file, or one without any study in it
    assert not db.exists() or optuna.get_all_study_summaries(f"sqlite:///{db}") == []


def test_a_declared_metric_is_accepted(tmp_path: Path) -> None:
    path = write_study(tmp_path, DIGITS_STUDY.format(metric="val_acc", direction="maximize"))
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = run_cli(["create-study", str(path), "--storage", url])
    assert result.returncode == 0, result.stderr
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["digits_typo"]


def test_an_objective_without_declared_metrics_is_not_checked(tmp_path: Path) -> None:
    path = quadratic_study(tmp_path)
    path.write_text(path.read_text().replace("metric: loss", "metric: anything_at_all"))
    assert load_study_file(path).metric == "anything_at_all"


def _image_spec(metric: str) -> dict[str, object]:
    return {
        "name": "t",
        "objective": "image_classifier",
        "data": {"format": "imagefolder", "root": "/nowhere"},
        "search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
        "metric": metric,
        "direction": "maximize",
        "n_trials": 1,
        "budget": {"max_epochs": 1},
        "sampler": "random",
    }


@pytest.mark.parametrize("metric", ["val_map", "val_top5", "val_acc", "train_loss", "lr"])
def test_image_classifier_declares_its_task_dependent_metrics(metric: str) -> None:
    from hpo.objective import check_objective

    spec = parse_study(_image_spec(metric), "s.yaml")
    assert check_objective(spec, "s.yaml") is IMAGE_CLASSIFIER


def test_image_classifier_suggests_the_closest_metric() -> None:
    from hpo.objective import check_objective

    spec = parse_study(_image_spec("val_mAP"), "s.yaml")
    with pytest.raises(SpecError) as caught:
        check_objective(spec, "s.yaml")
    assert caught.value.field == "metric"
    assert "did you mean val_map?" in str(caught.value)


def test_no_close_match_lists_the_declared_metrics_only() -> None:
    from hpo.objective import check_objective

    spec = parse_study(_image_spec("f1"), "s.yaml")
    with pytest.raises(SpecError, match=r"\(fix: declared metrics: val_loss, ") as caught:
        check_objective(spec, "s.yaml")
    assert "did you mean" not in str(caught.value)


def test_digits_declares_exactly_what_it_reports(tmp_path: Path) -> None:
    raw = {
        "name": "t",
        "objective": "digits_mlp",
        "data": {"subset": 0.2},
        "settings": {"hidden_units": 8},
        "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 1,
        "budget": {"max_epochs": 1},
        "sampler": "random",
    }
    run = TrialRun(
        trial=optuna.create_study().ask(),
        spec=parse_study(raw, "t"),
        params={"lr": 1e-2},
        max_epochs=1,
        device="cpu",
        checkpoint_dir=tmp_path,
        cache={},
    )
    digits_train(run)
    assert set(run.history) == set(DIGITS_MLP.metrics)
