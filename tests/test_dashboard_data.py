"""What hpo stores for optuna-dashboard and Optuna's CLI to show: the study note (the definition as
YAML), one figure per metric with every trial's curve, and attributes short enough to read. Read
back with optuna-dashboard's own functions and the real ``optuna`` CLI; studies written before
the long records moved (user attributes) are still read."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import ROOT, cli_env, run_cli
from optuna.trial import TrialState, create_trial
from optuna_dashboard import get_note
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects
from studyfiles import quadratic_study

from hpo import _optuna
from hpo._dashboard_data import (
    CHUNK_CHARS,
    CurvePublisher,
    curve_data,
    figure_id,
    publish_curves,
)
from hpo._records import (
    DEFINITION_KEY,
    HISTORY_KEY,
    METRICS_KEY,
    SUMMARY_MAX_CHARS,
    metrics_summary,
    trial_metrics,
)
from hpo.compare._plan import plan_comparison
from hpo.lifecycle import enqueue_configs, extend_study, replace_study
from hpo.spec import load_study_file
from hpo.storage import open_storage
from hpo.studies import create_study, history, stored_definition

SEVERAL = "hpo_dashboard_objectives:several_metrics"
# The widest row `optuna studies` / `optuna trials` may print for an hpo study (its columns are
# name, direction, n_trials, start, user_attrs / number, value, times, params, user_attrs, state).
STUDIES_ROW_MAX = 200
TRIALS_ROW_MAX = 400
ATTR_MAX = 300


def note_yaml(note: str) -> Any:
    match = re.search(r"```yaml\n(.*?)```", note, re.DOTALL)
    assert match, note
    return yaml.safe_load(match.group(1))


def figures(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The study's figures as optuna-dashboard reads them: graph object id -> parsed plotly JSON."""
    attrs = _optuna.study_storage(study).get_study_system_attrs(_optuna.study_id(study))
    return {key: json.loads(text) for key, text in get_plotly_graph_objects(attrs).items()}


def finished(
    number: int, values: list[float], state: TrialState = TrialState.COMPLETE, **extra: list[float]
) -> Any:
    """A finished trial whose study metric ``loss`` has ``values`` and other metrics ``extra``."""
    history = {"loss": values, **extra}
    return create_trial(
        state=state,
        value=values[-1] if state == TrialState.COMPLETE else None,
        params={"x": float(number)},
        distributions={"x": optuna.distributions.FloatDistribution(-100, 100)},
        intermediate_values=dict(enumerate(values, start=1)),
        system_attrs={METRICS_KEY: history},
    )


def test_the_note_shows_the_definition_as_yaml_and_follows_extend_and_replace(
    tmp_path: Path, sqlite_url: str
) -> None:
    storage = open_storage(sqlite_url)
    spec = load_study_file(quadratic_study(tmp_path, n_trials=3, sampler="random"))
    study, new = create_study(storage, spec)
    assert new
    note = get_note(study)  # optuna-dashboard's own reader
    assert note.startswith("## Study definition of quad\n")
    assert note_yaml(note) == stored_definition(study) == spec.definition()
    assert "History" not in note

    extend_study(storage, "quad", 2)
    study = optuna.load_study(study_name="quad", storage=storage)
    extended = get_note(study)
    assert note_yaml(extended)["n_trials"] == 5 == (stored_definition(study) or {})["n_trials"]
    assert re.search(r"^- \S+: extend n_trials=2$", extended, re.MULTILINE), extended
    attrs = _optuna.study_storage(study).get_study_system_attrs(_optuna.study_id(study))
    assert attrs["dashboard:note_ver"] == 2  # a note being edited in a browser is not lost silently

    longer = spec.model_copy(update={"n_trials": 4, "description": "replaced " + "x" * 3000})
    fresh, diff = replace_study(storage, longer, checkpoint_root=tmp_path / "ck")
    assert "n_trials" in diff
    note = get_note(fresh)
    assert len(note) > CHUNK_CHARS  # stored in several chunks, joined again by the dashboard
    assert note_yaml(note) == longer.definition()
    # The definition is no user attribute: only the study's short id is.
    assert set(fresh.user_attrs) <= {"hpo:uid"}


@pytest.mark.slow
def test_a_study_written_the_old_way_is_still_read_and_moves_when_extended(
    tmp_path: Path, sqlite_url: str
) -> None:
    # As hpo stored studies before: the definition and history as study user attributes, each
    # trial's metric history as the user attribute "metrics".
    spec = load_study_file(quadratic_study(tmp_path, name="old", n_trials=3, sampler="random"))
    study = optuna.create_study(storage=sqlite_url, study_name="old")
    record = {
        "action": "enqueue",
        "params": {"x": 1.0, "y": 0.0},
        "trial": 0,
        "at": "2026-01-01T00:00:00+00:00",
    }
    study.set_user_attr(DEFINITION_KEY, spec.definition())
    study.set_user_attr(HISTORY_KEY, [record])
    distributions = {n: optuna.distributions.FloatDistribution(-5, 5) for n in ("x", "y")}
    for number in range(3):
        study.add_trial(
            create_trial(
                params={"x": float(number), "y": 0.0},
                distributions=distributions,
                value=1.0 / (number + 1),
                intermediate_values={1: 2.0, 2: 1.0 / (number + 1)},
                user_attrs={"metrics": {"loss": [2.0, 1.0 / (number + 1)], "train_loss": [1.5, 0.5]}},
            )
        )
    study = optuna.load_study(study_name="old", storage=sqlite_url)
    assert stored_definition(study) == spec.definition()
    assert history(study) == [record]
    assert trial_metrics(study.trials[0]) == {"loss": [2.0, 1.0], "train_loss": [1.5, 0.5]}

    status = run_cli(["status", "--storage", sqlite_url])
    assert status.returncode == 0 and re.search(r"old\s+.\s+minimize\s+.\s+3/3", status.stdout), status.stdout
    exported = run_cli(["export", "old", "--storage", sqlite_url, "--format", "csv-long"])
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.splitlines()
    assert lines[0] == "number,state,params_x,params_y,epoch,loss,train_loss"
    assert lines[1:3] == ["0,COMPLETE,0.0,0.0,1,2.0,1.5", "0,COMPLETE,0.0,0.0,2,1.0,0.5"]

    extended = run_cli(["extend", "old", "--n-trials", "1", "--storage", sqlite_url])
    assert extended.returncode == 0, extended.stderr
    study = optuna.load_study(study_name="old", storage=sqlite_url)
    assert DEFINITION_KEY not in study.user_attrs and HISTORY_KEY not in study.user_attrs  # moved
    assert (stored_definition(study) or {})["n_trials"] == 4
    assert [r["action"] for r in history(study)] == ["enqueue", "extend"]
    assert note_yaml(get_note(study))["n_trials"] == 4


def numbered(*trials: Any) -> list[Any]:
    """The trials as a study stores them (numbered 0, 1, ... in order)."""
    study = optuna.create_study()
    for trial in trials:
        study.add_trial(trial)
    return study.get_trials()


def test_curve_data_has_every_finished_trials_curve_per_metric_the_study_metric_first() -> None:
    trials = numbered(
        finished(0, [3.0, 2.0, 1.0], val_acc=[0.1, 0.2, 0.3], train_loss=[2.0, 1.0, 0.5]),
        finished(1, [4.0], TrialState.PRUNED, val_acc=[0.05]),
        finished(2, [5.0, float("nan")], TrialState.FAIL, val_acc=[0.0, 0.01]),
        create_trial(state=TrialState.WAITING),
    )
    data = curve_data(trials, "loss")
    assert list(data) == ["loss", "train_loss", "val_acc"]
    assert [(c.number, c.state, c.epochs, c.values) for c in data["loss"]] == [
        (0, "COMPLETE", (1, 2, 3), (3.0, 2.0, 1.0)),
        (1, "PRUNED", (1,), (4.0,)),
        (2, "FAIL", (1,), (5.0,)),  # the failing epoch's NaN is left out (JSON has none)
    ]
    assert [c.number for c in data["val_acc"]] == [0, 1, 2]
    assert [c.number for c in data["train_loss"]] == [0]


def test_a_long_study_keeps_its_best_and_latest_curves() -> None:
    trials = numbered(*[finished(n, [float(abs(n - 10)) + 1.0]) for n in range(40)])
    kept = [c.number for c in curve_data(trials, "loss", "minimize", limit=10)["loss"]]
    assert len(kept) == 10
    assert {10, 9, 11, 8, 12} <= set(kept)  # the best five
    assert {39, 38, 37, 36, 35} <= set(kept)  # and the latest
    falling = numbered(*[finished(n, [1.0 / (n + 1)]) for n in range(40)])
    best_max = [c.number for c in curve_data(falling, "loss", "maximize", limit=4)["loss"]]
    assert best_max == [0, 1, 38, 39]
    # A multi-objective study's trials rank by their first value (no metric reported to a pruner).
    multi = optuna.create_study(directions=["minimize", "minimize"])
    for n in range(6):
        multi.add_trial(
            create_trial(values=[float(n), 1.0], system_attrs={METRICS_KEY: {"loss": [float(n)]}})
        )
    assert [c.number for c in curve_data(multi.get_trials(), "loss", limit=4)["loss"]] == [0, 1, 4, 5]


@pytest.mark.parametrize("url_kind", ["sqlite", "memory"])
def test_figures_are_read_back_by_optuna_dashboard_and_shrink_cleanly(url_kind: str, sqlite_url: str) -> None:
    study = optuna.create_study(storage=sqlite_url if url_kind == "sqlite" else None, study_name="f")
    for n in range(30):
        study.add_trial(finished(n, [10.0 / (n + e) for e in range(1, 21)], **{"val/acc": [0.5] * 20}))
    storage, study_id = _optuna.study_storage(study), _optuna.study_id(study)
    publish_curves(storage, study_id, "loss")
    shown = figures(study)
    assert set(shown) == {figure_id("loss"), figure_id("val/acc")}
    assert figure_id("val/acc").startswith("hpo-curves-val_acc-")  # an id the dashboard accepts
    loss = shown[figure_id("loss")]
    assert [t["name"] for t in loss["data"]] == [f"trial #{n}" for n in range(30)]
    assert loss["data"][0]["x"] == list(range(1, 21)) and loss["data"][0]["y"][0] == 10.0
    assert loss["layout"]["yaxis"]["title"]["text"] == "loss"
    attrs = storage.get_study_system_attrs(study_id)
    assert sum(k.startswith(f"dashboard:plot_data:{figure_id('loss')}:") for k in attrs) > 1  # chunked

    # Rewritten smaller over a longer figure's chunks (here another study's): stale chunks are blanked.
    small = optuna.create_study(storage=storage, study_name="g")
    small.add_trial(finished(0, [1.0, 0.5]))
    small_id = _optuna.study_id(small)
    for key, value in attrs.items():
        storage.set_study_system_attr(small_id, key, value)
    publish_curves(storage, small_id, "loss")
    assert [t["y"] for t in figures(small)[figure_id("loss")]["data"]] == [[1.0, 0.5]]


@pytest.mark.slow
def test_a_failed_figure_write_never_fails_a_trial(tmp_path: Path, sqlite_url: str) -> None:
    study_file = quadratic_study(tmp_path, name="nofig", n_trials=2, epochs=2, objective=SEVERAL)
    create_study(open_storage(sqlite_url), load_study_file(study_file))
    # The database itself refuses the figures (a real write error, not a stand-in).
    with sqlite3.connect(tmp_path / "hpo.db") as db:
        db.execute(
            "CREATE TRIGGER no_figures BEFORE INSERT ON study_system_attributes "
            "WHEN NEW.key LIKE 'dashboard:plot_data:%' BEGIN SELECT RAISE(ABORT, 'figures refused'); END"
        )
    worker = run_cli(["worker", "--study-name", "nofig", "--storage", sqlite_url, "--no-progress"])
    assert worker.returncode == 0, worker.stdout + worker.stderr
    output = worker.stdout + worker.stderr
    assert output.count("warning: could not update the dashboard's metric figures") == 1, output
    assert "figures refused" in output
    study = optuna.load_study(study_name="nofig", storage=sqlite_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert figures(study) == {}

    said: list[str] = []
    publisher = CurvePublisher(
        _optuna.study_storage(study), _optuna.study_id(study), "loss", "minimize", said.append
    )
    assert not publisher.publish() and not publisher.publish()
    assert len(said) == 1


def test_a_worker_rewrites_the_figures_at_most_every_few_seconds_and_when_it_stops(sqlite_url: str) -> None:
    study = optuna.create_study(storage=sqlite_url, study_name="t")
    storage, study_id = _optuna.study_storage(study), _optuna.study_id(study)
    said: list[str] = []
    publisher = CurvePublisher(storage, study_id, "loss", "minimize", said.append, min_interval=3600)
    study.add_trial(finished(0, [2.0, 1.0]))
    assert publisher.trial_ended()  # the first trial: at once
    study.add_trial(finished(1, [3.0]))
    assert not publisher.trial_ended()  # the next one within the interval: held back
    assert len(figures(study)[figure_id("loss")]["data"]) == 1
    assert publisher.finish()  # the worker stops: written
    assert [t["name"] for t in figures(study)[figure_id("loss")]["data"]] == ["trial #0", "trial #1"]
    assert not publisher.finish() and said == []  # nothing held back any more


@pytest.mark.slow
def test_optuna_cli_rows_and_every_attribute_are_short(tmp_path: Path, sqlite_url: str) -> None:
    # 12 epochs of 3 metrics: the per-epoch history (over 600 characters) would be too long.
    study_file = quadratic_study(tmp_path, name="short", n_trials=2, epochs=12, objective=SEVERAL)
    worker = run_cli(["worker", str(study_file), "--storage", sqlite_url, "--no-progress"])
    assert worker.returncode == 0, worker.stdout + worker.stderr
    storage = open_storage(sqlite_url)
    for i in range(3):  # a history of lifecycle records (what `hpo extend` and `hpo enqueue` run)
        extend_study(storage, "short", 1)
        enqueue_configs(storage, "short", [{"x": float(i), "y": 0.0}], "--params")

    optuna_cli = [str(Path(sys.executable).parent / "optuna")]  # the real `optuna` command
    env = cli_env()
    studies = subprocess.run(
        [*optuna_cli, "studies", "--storage", sqlite_url], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert studies.returncode == 0, studies.stderr
    assert "short" in studies.stdout and "hpo:uid" in studies.stdout
    assert max(len(line) for line in studies.stdout.splitlines()) <= STUDIES_ROW_MAX, studies.stdout
    trials = subprocess.run(
        [*optuna_cli, "trials", "--study-name", "short", "--storage", sqlite_url],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert trials.returncode == 0, trials.stderr
    assert "last_epoch" in trials.stdout
    assert max(len(line) for line in trials.stdout.splitlines()) <= TRIALS_ROW_MAX, trials.stdout

    study = optuna.load_study(study_name="short", storage=sqlite_url)
    for key, value in study.user_attrs.items():
        assert len(json.dumps(value)) <= ATTR_MAX, key
    for trial in study.trials:
        for key, value in trial.user_attrs.items():
            assert len(json.dumps(value)) <= ATTR_MAX, (trial.number, key)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and all(len(trial_metrics(t)["val_acc"]) == 12 for t in done)
    assert len(json.dumps(trial_metrics(done[0]))) > 2 * ATTR_MAX
    assert done[0].user_attrs["last_epoch"]["epoch"] == 12
    assert list(done[0].user_attrs["last_epoch"])[:2] == ["epoch", "loss"]  # the study metric first
    assert len(history(study)) == 6


def test_the_summary_attribute_stays_short_with_many_metrics() -> None:
    history_ = {f"metric_with_a_long_name_{i:02d}": [0.123456789] for i in range(40)}
    summary = metrics_summary({**history_, "loss": [1.23456789]}, "loss")
    assert len(json.dumps(summary)) <= SUMMARY_MAX_CHARS
    assert list(summary)[:2] == ["epoch", "loss"] and summary["loss"] == 1.235


def test_comparison_studies_are_named_so_they_sort_together(tmp_path: Path) -> None:
    base = load_study_file(quadratic_study(tmp_path, name="quad", n_trials=4, sampler="random"))
    plan = plan_comparison(base, ["random", "tpe"], 2, source="quad.yaml")
    names = [run.study_name for run in plan.runs]
    assert all(name.startswith("quad/") for name in names)
    # Among other studies, some with the same prefix, the runs stay one block when sorted by name.
    ordered = sorted([*names, "quad", "quad-other", "quadratic", "a-study", "zeta"])
    start = ordered.index(min(names))
    assert sorted(ordered[start : start + len(names)]) == sorted(names), ordered
