"""Study lifecycle end to end through the CLI: ``hpo extend``, ``hpo enqueue``, ``hpo delete-study``
and :func:`hpo.lifecycle.replace_study`, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import run_cli
from optuna.trial import TrialState
from studyfiles import quadratic_study

from hpo.lifecycle import replace_study
from hpo.spec import load_study_file
from hpo.storage import open_storage
from hpo.studies import checkpoint_folder, history, stored_definition


def _load(url: str, name: str = "quad") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _worker(url: str, tmp_path: Path, *target: str) -> None:
    args = ["worker", *target, "--storage", url, "--gpus", "none", "--no-progress"]
    result = run_cli([*args, "--checkpoint-dir", str(tmp_path / "ck")])
    assert result.returncode == 0, result.stdout + result.stderr


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state.is_finished()]


def _extend_then_work(url: str, tmp_path: Path) -> None:
    study_file = quadratic_study(tmp_path, n_trials=3, sampler="random")
    _worker(url, tmp_path, str(study_file))
    assert len(_finished(_load(url))) == 3

    result = run_cli(["extend", "quad", "--n-trials", "2", "--storage", url])
    assert result.returncode == 0, result.stderr
    assert "n_trials=5" in result.stdout
    study = _load(url)
    assert (stored_definition(study) or {})["n_trials"] == 5
    [record] = history(study)
    assert record["action"] == "extend" and record["n_trials"] == 2 and record["at"]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2

    # The original study file (n_trials: 3) still runs the extended study, to n + N trials.
    _worker(url, tmp_path, str(study_file))
    study = _load(url)
    assert len(study.trials) == 5 and len(_finished(study)) == 5
    again = run_cli(["create-study", str(study_file), "--storage", url, "--skip-if-exists"])
    assert again.returncode == 0, again.stderr
    assert len(_load(url).trials) == 5

    # Any other difference is still refused, and so is a file claiming a different n_trials.
    for changed in (
        quadratic_study(tmp_path, n_trials=3, sampler="random", epochs=4, filename="epochs.yaml"),
        quadratic_study(tmp_path, n_trials=4, sampler="random", filename="four.yaml"),
    ):
        refused = run_cli(["worker", str(changed), "--storage", url, "--gpus", "none"])
        assert refused.returncode == 2 and "different definition" in refused.stderr, refused.stderr


def test_extend_then_worker_runs_n_plus_n_sqlite(tmp_path: Path, sqlite_url: str) -> None:
    _extend_then_work(sqlite_url, tmp_path)


def test_extend_then_worker_runs_n_plus_n_postgres(tmp_path: Path, postgres_url: str) -> None:
    _extend_then_work(postgres_url, tmp_path)


def test_extend_refuses_grid_and_bad_counts(tmp_path: Path, sqlite_url: str) -> None:
    grid = quadratic_study(tmp_path, sampler="grid", n_trials=None, grid_x=[0, 1], grid_y=[0, 1])
    assert run_cli(["create-study", str(grid), "--storage", sqlite_url]).returncode == 0
    result = run_cli(["extend", "quad", "--n-trials", "2", "--storage", sqlite_url])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "grid" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    zero = run_cli(["extend", "quad", "--n-trials", "0", "--storage", sqlite_url])
    assert zero.returncode == 2 and "at least 1" in zero.stderr
    enq = run_cli(["enqueue", "quad", "--params", '{"x": 0, "y": 0}', "--storage", sqlite_url])
    assert enq.returncode == 2 and "grid" in enq.stderr


def test_extend_past_the_trial_limit_is_refused_before_anything_is_written(
    tmp_path: Path, sqlite_url: str
) -> None:
    study_file = quadratic_study(tmp_path, n_trials=3, sampler="random")
    assert run_cli(["create-study", str(study_file), "--storage", sqlite_url]).returncode == 0
    refused = run_cli(["extend", "quad", "--n-trials", "99998", "--storage", sqlite_url])
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "100,000" in refused.stderr and "--n-trials 99997 at most" in refused.stderr
    # The study is untouched and still works: it was broken for good when the total was stored
    # first and only then found invalid.
    study = _load(sqlite_url)
    assert (stored_definition(study) or {})["n_trials"] == 3 and history(study) == []
    assert run_cli(["extend", "quad", "--n-trials", "2", "--storage", sqlite_url]).returncode == 0
    status = run_cli(["status", "quad", "--storage", sqlite_url])
    assert status.returncode == 0 and "0/5 done" in status.stdout, status.stdout + status.stderr


def _enqueue_runs_first(url: str, tmp_path: Path) -> None:
    study_file = quadratic_study(tmp_path, n_trials=3, sampler="tpe")
    assert run_cli(["create-study", str(study_file), "--storage", url]).returncode == 0
    configs = tmp_path / "known.yaml"
    configs.write_text("- {x: 2.0, y: -1.0}\n- {x: 1, y: 0.5}\n")
    result = run_cli(["enqueue", "quad", "--from", str(configs), "--storage", url])
    assert result.returncode == 0, result.stderr
    study = _load(url)
    assert len(study.trials) == 3  # the budget is kept: the configurations took queued slots
    records = [r for r in history(study) if r["action"] == "enqueue"]
    assert [r["params"] for r in records] == [{"x": 2.0, "y": -1.0}, {"x": 1.0, "y": 0.5}]

    last = run_cli(["enqueue", "quad", "--params", '{"x": 0.0, "y": 0.0}', "--storage", url])
    assert last.returncode == 0 and "trial 2 " in last.stdout, last.stderr
    # Every slot taken: refused, with the fix.
    full = run_cli(["enqueue", "quad", "--params", '{"x": 0.0, "y": 0.0}', "--storage", url])
    assert full.returncode == 2 and "hpo extend quad --n-trials 1 first" in full.stderr, full.stderr
    study = _load(url)
    assert len(study.trials) == 3 and len(history(study)) == 3

    _worker(url, tmp_path, "--study-name", "quad", "--n-trials", "1")
    [first] = _finished(_load(url))
    assert first.params == {"x": 2.0, "y": -1.0}
    _worker(url, tmp_path, "--study-name", "quad")
    trials = sorted(_finished(_load(url)), key=lambda t: t.datetime_start)
    assert len(trials) == 3
    assert [t.params for t in trials] == [{"x": 2.0, "y": -1.0}, {"x": 1.0, "y": 0.5}, {"x": 0.0, "y": 0.0}]


def test_enqueue_runs_first_and_keeps_n_trials_sqlite(tmp_path: Path, sqlite_url: str) -> None:
    _enqueue_runs_first(sqlite_url, tmp_path)


def test_enqueue_runs_first_and_keeps_n_trials_postgres(tmp_path: Path, postgres_url: str) -> None:
    _enqueue_runs_first(postgres_url, tmp_path)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ('{"x": 1.0}', "parameter 'y' is missing"),
        ('{"x": 1.0, "y": 0.0, "z": 3}', "parameter 'z' is not in the study's search space"),
        ('{"x": 9.0, "y": 0.0}', "x=9.0 is outside the search space (fix: use a value in [-5.0, 5.0])"),
        ('{"x": "a", "y": 0.0}', "x='a' is outside the search space"),
        ("[]", "no configuration given"),
        ("{x: 1}", "--params: invalid JSON"),
    ],
)
def test_enqueue_refuses_invalid_params(tmp_path: Path, sqlite_url: str, params: str, expected: str) -> None:
    study_file = quadratic_study(tmp_path, n_trials=2, sampler="random")
    assert run_cli(["create-study", str(study_file), "--storage", sqlite_url]).returncode == 0
    result = run_cli(["enqueue", "quad", "--params", params, "--storage", sqlite_url])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    study = _load(sqlite_url)
    assert not any(t.system_attrs.get("fixed_params") for t in study.trials)
    assert history(study) == []


def test_delete_study_removes_study_checkpoints_and_artifacts(tmp_path: Path, sqlite_url: str) -> None:
    study_file = quadratic_study(tmp_path, n_trials=2, sampler="random")
    assert run_cli(["create-study", str(study_file), "--storage", sqlite_url]).returncode == 0
    study = _load(sqlite_url)
    folder = checkpoint_folder(tmp_path / "ck", study)
    (folder / "trial-0").mkdir(parents=True)
    (folder / "trial-0" / "state.json").write_text("{}")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    source = tmp_path / "plot.txt"
    source.write_text("a plot")
    store = optuna.artifacts.FileSystemArtifactStore(str(artifacts))
    trial = optuna.Trial(study, study.trials[0]._trial_id)
    artifact_id = optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(source), study_or_trial=trial
    )
    assert (artifacts / artifact_id).is_file()
    base = ["delete-study", "quad", "--storage", sqlite_url]
    paths = ["--checkpoint-dir", str(tmp_path / "ck"), "--artifact-dir", str(artifacts)]

    # No terminal (the test's stdin) and no --yes: refused, nothing deleted.
    refused = run_cli([*base, *paths])
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert folder.is_dir() and _load(sqlite_url)

    # RUNNING trials: refused unless --force.
    study.ask()
    running = run_cli([*base, *paths, "--yes"])
    assert running.returncode == 2 and "RUNNING" in running.stderr and "--force" in running.stderr

    deleted = run_cli([*base, *paths, "--yes", "--force"])
    assert deleted.returncode == 0, deleted.stderr
    assert "1 artifact file" in deleted.stdout
    assert not folder.exists() and not (artifacts / artifact_id).exists()
    assert optuna.get_all_study_names(sqlite_url) == []
    missing = run_cli([*base, "--yes"])
    assert missing.returncode == 2 and "no study named 'quad'" in missing.stderr


def test_replace_study_recreates_with_the_new_definition(tmp_path: Path, sqlite_url: str) -> None:
    old_file = quadratic_study(tmp_path, n_trials=2, sampler="random")
    _worker(sqlite_url, tmp_path, str(old_file))
    old = _load(sqlite_url)
    old_folder = checkpoint_folder(tmp_path / "ck", old)
    old_folder.mkdir(parents=True, exist_ok=True)
    new_file = quadratic_study(tmp_path, n_trials=4, sampler="random", epochs=5, filename="new.yaml")
    storage = open_storage(sqlite_url)

    study, diff = replace_study(storage, load_study_file(new_file), checkpoint_root=tmp_path / "ck")
    assert "-  max_epochs: 3" in diff and "+  max_epochs: 5" in diff and "+n_trials: 4" in diff
    assert not old_folder.exists()
    fresh = _load(sqlite_url)
    assert (stored_definition(fresh) or {})["n_trials"] == 4
    assert [t.state for t in fresh.trials] == [TrialState.WAITING] * 4
    assert checkpoint_folder(tmp_path / "ck", fresh) != old_folder  # a new uid
    assert study.study_name == "quad"
    # The old file is now refused; the new one runs.
    refused = run_cli(["worker", str(old_file), "--storage", sqlite_url, "--gpus", "none"])
    assert refused.returncode == 2 and "different definition" in refused.stderr
    _worker(sqlite_url, tmp_path, str(new_file))
    assert len(_finished(_load(sqlite_url))) == 4
    # Replacing an unchanged study gives an empty diff.
    _, same = replace_study(storage, load_study_file(new_file), checkpoint_root=tmp_path / "ck")
    assert same == ""
    assert json.dumps((stored_definition(_load(sqlite_url)) or {})["n_trials"]) == "4"


def test_create_study_replace_through_the_cli_prints_the_difference(tmp_path: Path, sqlite_url: str) -> None:
    old_file = quadratic_study(tmp_path, n_trials=2, sampler="random")
    assert run_cli(["create-study", str(old_file), "--storage", sqlite_url]).returncode == 0
    new_file = quadratic_study(tmp_path, n_trials=3, sampler="random", epochs=5, filename="new.yaml")
    both = run_cli(["create-study", str(new_file), "--storage", sqlite_url, "--replace", "--skip-if-exists"])
    assert both.returncode == 2  # one or the other
    replaced = run_cli(["create-study", str(new_file), "--storage", sqlite_url, "--replace"])
    assert replaced.returncode == 0, replaced.stderr
    assert "+  max_epochs: 5" in replaced.stdout and "replaced" in replaced.stdout
    assert [t.state for t in _load(sqlite_url).trials] == [TrialState.WAITING] * 3


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (bytes(range(128, 256)), "is not UTF-8 text (byte 0x80 at offset 0)"),
        (b"- {x: 1\n", "invalid YAML"),
        (None, "file of configurations not found"),
    ],
)
def test_enqueue_from_a_bad_file_is_one_line(
    tmp_path: Path, sqlite_url: str, content: bytes | None, fragment: str
) -> None:
    study_file = quadratic_study(tmp_path, n_trials=3, sampler="random")
    assert run_cli(["create-study", str(study_file), "--storage", sqlite_url]).returncode == 0
    configs = tmp_path / "configs.yaml"
    if content is not None:
        configs.write_bytes(content)
    result = run_cli(["enqueue", "quad", "--from", str(configs), "--storage", sqlite_url])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(configs) in line and fragment in line, line
