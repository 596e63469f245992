"""Multi-objective studies: ``metric: [val_loss, train_seconds]`` with one direction per metric.

Validation at load time (one line naming file, field and fix), the samplers that support several
objectives, the built-in ``train_seconds`` metric (excluded, as timing must be, when a resumed
trial is compared with the uninterrupted run), and the whole life through the CLI: ``hpo worker``
on SQLite, ``hpo best`` printing the Pareto front, ``optuna best-trials`` reading the same front,
``hpo status`` and ``hpo export`` showing every value, and the commands that refuse such a study.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard
import pytest
import torch
import yaml
from conftest import ROOT, cli_env, run_cli, write_study
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from hpo import _optuna
from hpo._records import trial_metrics
from hpo.cli import main
from hpo.errors import SpecError
from hpo.objective import TRAIN_SECONDS, Objective, TrialRun
from hpo.spec import canonical, load_study_file, parse_study, spec_from_definition
from hpo.storage import open_storage
from hpo.studies import create_study, load_study_spec
from hpo.training import CHECKPOINT_FILE
from hpo.worker import Worker, WorkerOptions
from objectives.digits import train as train_digits

PARETO = ROOT / "studies" / "digits_pareto.yaml"


def digits_study(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "mo",
        "objective": "digits_mlp",
        "data": {"val_fraction": 0.2, "subset": 0.3},
        "settings": {"hidden_units": 16, "hidden_layers": 1, "batch_size": 64, "scheduler": "none"},
        "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
        "metric": ["val_loss", "train_seconds"],
        "direction": ["minimize", "minimize"],
        "n_trials": 4,
        "budget": {"max_epochs": 3},
        "seed": 0,
        "sampler": {"name": "tpe"},
    }
    raw.update(changes)
    return raw


# ------------------------------------------------------------------------- load-time checks


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"direction": "minimize"},
            "direction: has 1 entry but metric has 2 (fix: give one direction per metric, in the same "
            "order, e.g. direction: [minimize, minimize])",
        ),
        (
            {"direction": ["minimize", "minimize", "maximize"]},
            "direction: has 3 entries but metric has 2",
        ),
        (
            {"metric": ["val_loss", "val_loss"]},
            "metric[1]: 'val_loss' is listed twice (fix: list each metric once)",
        ),
        (
            {"metric": ["val_loss", "train_secs"]},
            "metric[1]: 'train_secs' is not a metric this objective reports (fix: did you mean train_seconds?",
        ),
        (
            {"metric": ["val_loss", "f1"]},
            "metric[1]: 'f1' is not a metric this objective reports (fix: declared metrics: val_loss, "
            "val_acc, train_loss; built in: train_seconds)",
        ),
        (
            {"direction": ["minimize", "minimise"]},
            "direction[1]: 'minimise' is not a direction (fix: did you mean minimize? use minimize or maximize)",
        ),
        ({"metric": []}, "metric: must be a metric name or a list of them, got []"),
        ({"metric": ["val_loss", 3]}, "metric: must be a metric name or a list of them"),
        (
            {"sampler": {"name": "bohb", "options": {"min_budget": 1, "max_budget": 3}}},
            "sampler.name: bohb cannot optimise several objectives (2 metrics) (fix: use nsga2, tpe, "
            "random, gp or grid, or a single metric)",
        ),
        ({"sampler": {"name": "cmaes"}}, "sampler.name: cmaes cannot optimise several objectives"),
        (
            {"pruner": {"name": "median"}},
            "pruner: Optuna does not prune multi-objective studies (2 metrics) (fix: remove pruner:, "
            "or use a single metric)",
        ),
    ],
    ids=[
        "one-direction",
        "three-directions",
        "duplicate",
        "typo",
        "unknown",
        "bad-direction",
        "empty",
        "not-a-name",
        "bohb",
        "cmaes",
        "pruner",
    ],
)
def test_bad_multi_objective_fields_are_one_line_naming_file_field_and_fix(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    path = write_study(tmp_path, yaml.safe_dump(digits_study(**changes)))
    with pytest.raises(SpecError) as caught:
        load_study_file(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {expected}"), text


def test_the_cli_refuses_a_pruned_multi_objective_study_in_one_line_and_creates_nothing(
    tmp_path: Path,
) -> None:
    path = write_study(tmp_path, yaml.safe_dump(digits_study(pruner={"name": "median"})))
    db = tmp_path / "hpo.db"
    result = run_cli(["create-study", str(path), "--storage", f"sqlite:///{db}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: pruner: Optuna does not prune multi-objective studies (2 metrics) "
        "(fix: remove pruner:, or use a single metric)"
    ]
    assert not db.exists() or optuna.get_all_study_summaries(f"sqlite:///{db}") == []


def test_definitions_keep_a_single_metric_a_string_and_a_list_a_list() -> None:
    """Stored definitions of single-objective studies are unchanged (``metric: val_loss``), so
    studies stored before multi-objective support still match their files."""
    single = parse_study(digits_study(metric="val_loss", direction="minimize"), "single.yaml")
    assert (single.metrics, single.directions, single.is_multi_objective) == (
        ("val_loss",),
        ("minimize",),
        False,
    )
    assert (single.definition()["metric"], single.definition()["direction"]) == ("val_loss", "minimize")
    listed_one = parse_study(digits_study(metric=["val_loss"], direction=["minimize"]), "one.yaml")
    assert canonical(listed_one.definition()) == canonical(single.definition())

    multi = parse_study(digits_study(), "multi.yaml")
    definition = multi.definition()
    assert definition["metric"] == ["val_loss", "train_seconds"]
    assert definition["direction"] == ["minimize", "minimize"]
    assert (multi.metric, multi.direction, multi.is_multi_objective) == ("val_loss", "minimize", True)
    again = spec_from_definition(json.loads(json.dumps(definition)), "stored")
    assert again.metrics == multi.metrics and again.directions == multi.directions


def test_the_shipped_pareto_study_loads() -> None:
    spec = load_study_file(PARETO)
    assert spec.metrics == ("val_loss", "train_seconds")
    assert spec.directions == ("minimize", "minimize")
    assert spec.sampler.name == "nsga2" and spec.pruner.name == "none"


# ------------------------------------------------------------------------- samplers, in process


def two_metrics(run: TrialRun) -> float:
    """``loss`` falls towards (x - 2)^2 over the epochs; ``size`` is |y| plus a little per epoch."""
    x, y = float(run.config["x"]), float(run.config["y"])
    for epoch in range(1, run.max_epochs + 1):
        if run.report(epoch, {"loss": (x - 2.0) ** 2 + 1.0 / epoch, "size": abs(y) + 0.01 * epoch}):
            break
    return run.final_value()


def dominated(trial: FrozenTrial, others: list[FrozenTrial]) -> bool:
    return any(
        all(a <= b for a, b in zip(o.values, trial.values, strict=True)) and o.values != trial.values
        for o in others
    )


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", "gp", "grid"])
def test_samplers_that_support_several_objectives_run_a_study(sampler: str, tmp_path: Path) -> None:
    grid = sampler == "grid"
    raw = {
        "name": f"two-{sampler}",
        "objective": "two_metrics",
        "search_space": {
            "x": {"type": "float", "low": -1.0, "high": 3.0, **({"grid": [0.0, 2.0]} if grid else {})},
            "y": {"type": "float", "low": -1.0, "high": 1.0, **({"grid": [-1.0, 0.5]} if grid else {})},
        },
        "metric": ["loss", "size"],
        "direction": ["minimize", "minimize"],
        "budget": {"max_epochs": 2},
        "sampler": {"name": sampler, **({"options": {"population_size": 2}} if sampler == "nsga2" else {})},
        **({} if grid else {"n_trials": 5}),
    }
    spec = parse_study(raw, "two.yaml")
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    create_study(storage, spec)
    study, stored = load_study_spec(storage, spec.name)
    out = io.StringIO()
    options = WorkerOptions(show_progress=False, checkpoint_root=tmp_path / "ck")
    objective = Objective(train=two_metrics, metrics=("loss", "size"))
    summary = Worker(study, stored, options, objective=objective, console=Console(file=out)).run()

    trials = study.get_trials(deepcopy=False)
    expected = 4 if grid else 5
    assert summary.finished == {"COMPLETE": expected, "PRUNED": 0, "FAIL": 0}, out.getvalue()
    assert study.metric_names == ["loss", "size"]
    for t in trials:
        x, y = t.params["x"], t.params["y"]
        # every metric at the scored epoch (the last, no early stopping here)
        assert t.values == pytest.approx([(x - 2.0) ** 2 + 0.5, abs(y) + 0.02])
        assert t.intermediate_values == pytest.approx({1: (x - 2.0) ** 2 + 1.0, 2: (x - 2.0) ** 2 + 0.5})
    front = study.best_trials
    assert front and all(not dominated(t, trials) for t in front)
    assert f"trial 0 COMPLETE values={trials[0].values[0]:.6g}, {trials[0].values[1]:.6g}" in out.getvalue()
    if grid:
        assert sorted((t.params["x"], t.params["y"]) for t in trials) == [
            (0.0, -1.0),
            (0.0, 0.5),
            (2.0, -1.0),
            (2.0, 0.5),
        ]


# ------------------------------------------------------------------------- scored epoch, train_seconds


def test_values_are_every_metric_at_the_epoch_early_stopping_scores() -> None:
    """Early stopping watches the first metric; every value is taken at the epoch it scores."""
    spec = parse_study(
        digits_study(
            metric=["val_loss", "val_acc"],
            direction=["minimize", "maximize"],
            early_stopping={"rule": "patience", "patience": 2},
        ),
        "es.yaml",
    )
    # A real trial, of a single-objective study: Optuna's own Trial.report refuses multi-objective
    # studies, which the worker's trials never call (they report through the worker).
    trial = optuna.create_study().ask()
    run = TrialRun(
        trial=trial, spec=spec, params={}, max_epochs=10, device="cpu", checkpoint_dir=Path("."), cache={}
    )
    losses, accs = [0.9, 0.5, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]
    stops = [
        run.report(epoch, {"val_loss": v, "val_acc": a})
        for epoch, (v, a) in enumerate(zip(losses, accs, strict=True), 1)
    ]
    assert stops == [False, False, False, True]  # two epochs without beating epoch 2
    assert run.final_values() == [0.5, 0.2]  # epoch 2's values, not the last epoch's accuracy


def test_train_seconds_is_recorded_each_epoch_when_a_study_names_it() -> None:
    spec = parse_study(digits_study(), "ts.yaml")
    run = TrialRun(
        trial=optuna.create_study().ask(),
        spec=spec,
        params={},
        max_epochs=3,
        device="cpu",
        checkpoint_dir=Path("."),
        cache={},
    )
    for epoch in (1, 2, 3):
        run.report(epoch, {"val_loss": 1.0 / epoch})
    seconds = run.history[TRAIN_SECONDS]
    assert len(seconds) == 3 and 0.0 < seconds[0] < seconds[1] < seconds[2] < 60.0
    assert run.final_values() == [1.0 / 3, seconds[2]]
    # a study that does not name it never records it: its curves stay exactly reproducible
    single = parse_study(digits_study(metric="val_loss", direction="minimize"), "s.yaml")
    other = TrialRun(
        trial=optuna.create_study().ask(),
        spec=single,
        params={},
        max_epochs=1,
        device="cpu",
        checkpoint_dir=Path("."),
        cache={},
    )
    other.report(1, {"val_loss": 1.0})
    assert TRAIN_SECONDS not in other.history


class WorkerKilled(BaseException):
    """What the crashed attempt dies of: nothing in the objective catches it."""


def _attempt(spec: Any, checkpoint_dir: Path, crash_after: int | None = None) -> TrialRun:
    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        if crash_after is not None and epoch == crash_after:
            raise WorkerKilled(f"killed after epoch {epoch}")

    run = TrialRun(
        trial=optuna.create_study(pruner=optuna.pruners.NopPruner()).ask(),
        spec=spec,
        params={"lr": 0.03},
        max_epochs=spec.budget.max_epochs,
        device="cpu",
        checkpoint_dir=checkpoint_dir,
        cache={},
        on_epoch=on_epoch,
    )
    if crash_after is None:
        train_digits(run)
    else:
        with pytest.raises(WorkerKilled):
            train_digits(run)
    return run


def test_a_resumed_trial_matches_the_uninterrupted_run_except_for_its_timing(tmp_path: Path) -> None:
    """Resuming is exact for every metric but train_seconds, which goes on from the checkpoint's."""
    spec = parse_study(digits_study(budget={"max_epochs": 4}), "resume.yaml")
    whole = _attempt(spec, tmp_path / "whole")
    crashed = _attempt(spec, tmp_path / "trial", crash_after=3)
    assert torch.load(tmp_path / "trial" / CHECKPOINT_FILE, weights_only=True)["epoch"] == 2
    retry = _attempt(spec, tmp_path / "trial")

    assert set(retry.history) == set(whole.history) == {"val_loss", "val_acc", "train_loss", TRAIN_SECONDS}
    for name, values in whole.history.items():
        if name != TRAIN_SECONDS:  # timing never repeats exactly
            assert retry.history[name] == values, name
    seconds = retry.history[TRAIN_SECONDS]
    assert seconds[:2] == crashed.history[TRAIN_SECONDS][:2]  # restored with the checkpoint
    assert len(seconds) == 4 and all(a < b for a, b in itertools.pairwise(seconds))
    assert retry.final_values()[0] == whole.final_values()[0]


# ------------------------------------------------------------------------- the CLI, end to end


def hpo(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``hpo ARGS`` in this process (the CLI's own parsing and output; no interpreter start-up)."""
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dashboard_json(url: str, path: str) -> Any:
    """GET ``path`` from optuna-dashboard's WSGI app on the storage ``url``."""
    app = optuna_dashboard.wsgi(optuna.storages.RDBStorage(url))
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
    statuses: list[str] = []
    body = b"".join(app(environ, lambda status, headers, *_: statuses.append(status)))
    assert statuses == ["200 OK"], body[:200]
    return json.loads(body)


def test_pareto_study_through_the_cli_and_the_optuna_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load(PARETO.read_text())
    raw.update(n_trials=5, budget={"max_epochs": 3}, data={"val_fraction": 0.2, "subset": 0.3})
    raw["search_space"]["hidden_units"]["high"] = 64
    raw["sampler"]["options"] = {"population_size": 4}
    path = write_study(tmp_path, yaml.safe_dump(raw), "pareto.yaml")
    url = f"sqlite:///{tmp_path / 'hpo.db'}"

    # The worker as a user starts it: its own process, the trainer a child of it.
    worker = run_cli(
        ["worker", str(path), "--storage", url, "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress"]
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    study = optuna.load_study(study_name="digits_pareto", storage=url)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert study.metric_names == ["val_loss", "train_seconds"]
    for t in trials:
        curves = trial_metrics(t)
        losses, seconds = curves["val_loss"], curves[TRAIN_SECONDS]
        epoch = losses.index(min(losses))  # patience scores the best epoch of the first metric
        assert t.values == [losses[epoch], seconds[epoch]]
        assert list(t.intermediate_values.values()) == losses
    front = sorted(t.number for t in study.best_trials)
    assert front

    code, out, err = hpo(["best", "digits_pareto", "--storage", url], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        f"Pareto front of digits_pareto: {len(front)} trial(s); val_loss (minimize), train_seconds (minimize)"
    )
    assert [int(line.split()[1].rstrip(":")) for line in lines[1:]] == front
    first = study.trials[front[0]]
    assert f"val_loss={first.values[0]:.6g}  train_seconds={first.values[1]:.6g}" in lines[1]
    as_json = json.loads(hpo(["best", "digits_pareto", "--storage", url, "--json"], capsys)[1])
    assert [t["number"] for t in as_json["best_trials"]] == front
    assert as_json["metrics"] == ["val_loss", "train_seconds"]

    # The real optuna CLI reads the same front, by metric name.
    optuna_bin = str(Path(sys.executable).parent / "optuna")
    optuna_cli = subprocess.run(
        [optuna_bin, "best-trials", "--study-name", "digits_pareto", "--storage", url, "-f", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert optuna_cli.returncode == 0, optuna_cli.stderr
    rows = json.loads(optuna_cli.stdout)
    assert sorted(row["number"] for row in rows) == front
    for row in rows:
        values = study.trials[row["number"]].values
        assert row["values"] == dict(zip(["val_loss", "train_seconds"], values, strict=True))

    # optuna-dashboard's own API (its WSGI app, in this process): named objectives, the same front.
    detail = dashboard_json(url, f"/api/studies/{_optuna.study_id(study)}")
    assert detail["objective_names"] == ["val_loss", "train_seconds"]
    assert detail["directions"] == ["minimize", "minimize"]
    assert sorted(t["number"] for t in detail["best_trials"]) == front

    code, out, err = hpo(["status", "digits_pareto", "--storage", url], capsys)
    assert code == 0, err
    assert f"Pareto front: {len(front)} trial(s)" in out
    assert f"trial {front[0]}: val_loss={first.values[0]:.6g}  train_seconds={first.values[1]:.6g}" in out
    out = hpo(["status", "--storage", url], capsys)[1]
    assert "minimize, minimize" in out and f"front of {len(front)}" in out

    out = hpo(["export", "digits_pareto", "--storage", url, "--format", "csv"], capsys)[1]
    rows_csv = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["values_val_loss"]) for r in rows_csv] == [t.values[0] for t in trials]
    assert [float(r["values_train_seconds"]) for r in rows_csv] == [t.values[1] for t in trials]
    records = json.loads(hpo(["export", "digits_pareto", "--storage", url, "--format", "json"], capsys)[1])
    assert [r["values"] for r in records["trials"]] == [t.values for t in trials]

    # Commands built on a single best value refuse the study in one line.
    for args, words in [
        (["retrain", "digits_pareto", "--storage", url, "--epochs", "2"], "needs a single-objective study"),
        (
            ["compare", str(path), "--samplers", "tpe,random", "--seeds", "1"],
            "comparisons need a single metric",
        ),
        (
            ["worker", str(path), "--storage", url, "--backend", "ray"],
            "the Ray backend runs single-objective",
        ),
    ]:
        code, out, err = hpo(args, capsys)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and words in err, err


def test_single_objective_studies_get_their_metric_name_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    code, _, err = hpo(["create-study", "studies/digits_quickstart.yaml", "--storage", url], capsys)
    assert code == 0, err
    assert optuna.load_study(study_name="digits_quickstart", storage=url).metric_names == ["val_loss"]
