"""An objective in the user's own project (``objective: myproj.model:OBJECTIVE``) is found next
to its study file or in the current directory, without PYTHONPATH (hpo._objective_path), by the
worker, its trainer process, ``hpo retrain`` and Ray; folders are never taken from the database."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import cli_env

from hpo import _optuna
from hpo.studies import DEFINITION_ATTR, stored_definition
from hpo.trainer import TrialJob, trainer_main

HPO = Path(sys.executable).parent / "hpo"  # the console script: no implicit current directory

MODEL = """
from pathlib import Path

from hpo.objective import Objective

(Path(__file__).parent / "IMPORTED").write_text("yes")


def train(run):
    x = float(run.config["x"])
    for epoch in range(1, run.max_epochs + 1):
        if run.report(epoch, {"loss": (x - 1.0) ** 2 + 1.0 / epoch}):
            break
    return run.final_value()


OBJECTIVE = Objective(train=train, metrics=("loss",))
"""

STUDY = """name: {name}
objective: {objective}
search_space:
  x: {{type: float, low: -5, high: 5}}
metric: loss
direction: minimize
n_trials: 2
budget: {{max_epochs: 2}}
sampler: {{name: random, seed: 1}}
"""


def project(root: Path, *, beside: bool = False, package: str = "myproj", objective: str = "") -> Path:
    """``root/studies/my.yaml`` and the package ``package/model.py`` in ``root`` (or, ``beside``,
    in ``root/studies``). Returns the study file."""
    studies = root / "studies"
    studies.mkdir(parents=True)
    code = (studies if beside else root) / package
    code.mkdir()
    (code / "__init__.py").write_text("")
    (code / "model.py").write_text(MODEL)
    study = studies / "my.yaml"
    study.write_text(STUDY.format(name="mine", objective=objective or f"{package}.model:OBJECTIVE"))
    return study


def user_env() -> dict[str, str]:
    """A user's shell: no PYTHONPATH, no allow-list from the test suite."""
    env = cli_env()
    env.pop("PYTHONPATH", None)
    env.pop("HPO_ALLOW_OBJECTIVES", None)
    return env


def hpo(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HPO), *args], cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=300
    )


def states(url: str, name: str = "mine") -> list[str]:
    return sorted(t.state.name for t in optuna.load_study(study_name=name, storage=url).trials)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("beside", "from_project"),
    [(False, False), (True, False), (False, True)],
    ids=["package-above-studies/run-elsewhere", "package-in-studies/run-elsewhere", "run-in-project"],
)
def test_an_own_objective_next_to_the_study_file_runs_without_pythonpath(
    tmp_path: Path, beside: bool, from_project: bool
) -> None:
    study = project(tmp_path / "proj", beside=beside)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = tmp_path / "proj" if from_project else elsewhere
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    path = "studies/my.yaml" if from_project else str(study)
    result = hpo(
        ["worker", path, "--storage", url, "--checkpoint-dir", str(tmp_path / "ck"), "--no-progress"], cwd
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert states(url) == ["COMPLETE", "COMPLETE"]


def test_a_missing_module_is_one_line_naming_the_file_the_field_and_the_fix(tmp_path: Path) -> None:
    study = project(tmp_path / "proj", objective="myprj.model:OBJECTIVE")
    result = hpo(["create-study", str(study), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {study}: objective: cannot import module 'myprj.model': ")
    # the folders searched, relative to the current directory (tmp_path) where below it
    assert "no package or module 'myprj' in proj/studies, proj, the current directory or the" in lines[0]
    assert "(fix: put myprj/ (or myprj.py) in the study file's folder or the folder above it" in lines[0]

    study.write_text(study.read_text().replace("myprj.model", "myproj.modl"))
    result = hpo(["create-study", str(study), "--storage", f"sqlite:///{tmp_path / 'hpo.db'}"], tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "objective: cannot import module 'myproj.modl'" in result.stderr
    assert "(fix: check the module path; myproj/modl.py must exist" in result.stderr


@pytest.mark.slow
def test_a_worker_by_study_name_imports_from_no_folder_the_database_names(tmp_path: Path) -> None:
    """The stored definition names a module, never a folder: a ``--study-name`` worker looks only
    in its own current directory (and --objective-path), and only for an allowed module."""
    study = project(tmp_path / "proj")
    marker = tmp_path / "proj" / "myproj" / "IMPORTED"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    created = hpo(["create-study", str(study), "--storage", url], elsewhere)
    assert created.returncode == 0, created.stderr
    marker.unlink()
    worker = ["worker", "--study-name", "mine", "--storage", url, "--checkpoint-dir", str(tmp_path / "ck")]

    # not allowed: refused before any lookup
    refused = hpo([*worker, "--no-progress"], tmp_path / "proj")
    assert refused.returncode == 2 and "is not allowed on this worker" in refused.stderr
    # allowed, but the study file's folder is nowhere on this worker's side
    missing = hpo([*worker, "--allow-objective", "myproj.*"], elsewhere)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert (
        "cannot import module 'myproj.model'" in missing.stderr and "the current directory" in missing.stderr
    )
    assert not marker.exists()

    # a hostile row cannot add a folder to search: the definition's fields are fixed
    storage_study = optuna.load_study(study_name="mine", storage=url)
    honest = dict(stored_definition(storage_study) or {})
    rows = _optuna.study_storage(storage_study)
    study_id = _optuna.study_id(storage_study)
    for key in ("objective_path", "search_path", "pythonpath"):
        rows.set_study_system_attr(study_id, DEFINITION_ATTR, {**honest, key: [str(tmp_path / "proj")]})
        tampered = hpo([*worker, "--allow-objective", "myproj.*"], elsewhere)
        assert tampered.returncode == 2 and f"{key}: unknown field" in tampered.stderr, tampered.stderr
        assert not marker.exists()
    rows.set_study_system_attr(study_id, DEFINITION_ATTR, honest)

    # run from the project folder (or pointed at it), the worker and its trainer find it
    ran = hpo(
        [*worker, "--allow-objective", "myproj.*", "--n-trials", "1", "--no-progress"], tmp_path / "proj"
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    flagged = hpo(
        [
            *worker,
            "--allow-objective",
            "myproj.*",
            "--objective-path",
            str(tmp_path / "proj"),
            "--no-progress",
        ],
        elsewhere,
    )
    assert flagged.returncode == 0, flagged.stdout + flagged.stderr
    assert states(url) == ["COMPLETE", "COMPLETE"]

    # hpo retrain: the same rules
    retrain = ["retrain", "mine", "--epochs", "2", "--storage", url, "--device", "cpu"]
    missing = hpo([*retrain, "--allow-objective", "myproj.*", "--output", str(tmp_path / "r1")], elsewhere)
    assert missing.returncode == 2 and "cannot import module 'myproj.model'" in missing.stderr, missing.stderr
    retrained = hpo(
        [*retrain, "--allow-objective", "myproj.*", "--output", str(tmp_path / "r2")], tmp_path / "proj"
    )
    assert retrained.returncode == 0, retrained.stdout + retrained.stderr
    assert "retrained 1 of 1" in retrained.stdout


def test_the_trainer_process_looks_in_the_folders_of_its_job(tmp_path: Path) -> None:
    """The spawned trainer gets the folders in the job message, not from global state."""
    project(tmp_path / "proj", package="ownproj_trainer")
    assert str(tmp_path / "proj") not in sys.path
    study = (tmp_path / "proj" / "studies" / "my.yaml").read_text()
    import yaml

    definition = yaml.safe_load(study)
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=True)
    process = context.Process(target=trainer_main, args=(child, os.getpid()))
    process.start()
    child.close()
    try:
        assert parent.recv()[0] == "ready"

        def run(number: int, folders: tuple[str, ...]) -> tuple[object, ...]:
            job = TrialJob(
                number=number,
                definition=json.loads(json.dumps(definition)),
                objective="ownproj_trainer.model:OBJECTIVE",
                params={"x": 1.0},
                max_epochs=2,
                device="cpu",
                checkpoint_dir=str(tmp_path / "ck"),
                prunes=False,
                objective_path=folders,
            )
            parent.send(job.to_message())
            while True:
                message = parent.recv()
                if message[0] in ("done", "failed"):
                    return tuple(message)

        failed = run(0, ())
        assert failed[0] == "failed" and failed[1] == "SpecError", failed
        assert "cannot import module 'ownproj_trainer.model'" in str(failed[2])
        assert run(1, (str(tmp_path / "proj"),)) == ("done", pytest.approx(0.5))
        parent.send(("exit",))
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_trials_find_an_own_objective_next_to_the_study_file(tmp_path: Path) -> None:
    study = project(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    env = user_env()
    env.pop("RAY_ADDRESS", None)  # a local instance of its own, of 2 CPUs
    env.update({"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2, "GPU": 0}), "RAY_USAGE_STATS_ENABLED": "0"})
    result = subprocess.run(
        [str(HPO), "worker", str(study), "--storage", url, "--backend", "ray", "--checkpoint-dir", "ck"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert states(url) == ["COMPLETE", "COMPLETE"]


def test_gpu_child_workers_get_the_folders_on_their_command_line(tmp_path: Path) -> None:
    from hpo.cli import _child_args, build_parser
    from hpo.policy import ObjectivePolicy

    parser = build_parser()
    args = parser.parse_args(["worker", str(tmp_path / "my.yaml")])
    policy = ObjectivePolicy.from_sources(trusted=["myproj.model:OBJECTIVE"], environ={})
    child = _child_args(args, "mine", policy, (str(tmp_path / "proj"), str(tmp_path)))
    parsed = parser.parse_args(["worker", *child])
    assert parsed.study_file is None and parsed.study_name == "mine"
    assert parsed.objective_path == [str(tmp_path / "proj"), str(tmp_path)]
    assert parsed.allow_objective == ["myproj.model"]
