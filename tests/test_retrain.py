"""``hpo retrain``: the best trials trained for longer, curves recorded, final models saved."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from conftest import ROOT, cli_env, run_cli
from optuna.trial import TrialState
from studyfiles import quadratic_study
from synthetic_data import make_celeba, make_imagefolder

from hpo._records import trial_metrics
from hpo.artifacts import resolve_model_reference
from hpo.errors import HpoError
from hpo.studies import stored_definition
from objectives.digits import DigitsConfig, build_model
from objectives.vision.models import ModelOptions
from objectives.vision.models import build_model as build_vision_model


def _copy_study(source: Path, directory: Path, **changes: Any) -> Path:
    raw = yaml.safe_load(source.read_text())
    if isinstance(raw["search_space"], str):
        raw["search_space"] = str((source.parent / raw["search_space"]).resolve())
    for key, value in changes.items():
        raw[key] = (
            {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
        )
    path = directory / source.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run(args: list[str]) -> str:
    result = run_cli(args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_retrain_digits_quickstart_top2(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    storage = request.getfixturevalue(f"{backend}_url")
    study_file = _copy_study(
        ROOT / "studies" / "digits_quickstart.yaml", tmp_path, n_trials=3, budget={"max_epochs": 3}
    )
    _run(
        [
            "worker",
            str(study_file),
            "--storage",
            storage,
            "--no-progress",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
        ]
    )
    output = tmp_path / "retrained"
    stdout = _run(
        [
            "retrain",
            "digits_quickstart",
            "--epochs",
            "4",
            "--top",
            "2",
            "--storage",
            storage,
            "--output",
            str(output),
            "--device",
            "cpu",
        ]
    )
    assert "retrained 2 of 2 configuration(s)" in stdout

    search = optuna.load_study(study_name="digits_quickstart", storage=storage)
    ranked = sorted(search.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (t.value, t.number))
    retrained = optuna.load_study(study_name="digits_quickstart/retrain", storage=storage).get_trials()
    assert [t.state for t in retrained] == [TrialState.COMPLETE, TrialState.COMPLETE]
    for rank, (source, trial) in enumerate(zip(ranked[:2], retrained, strict=True), start=1):
        assert trial.params == source.params
        assert trial.user_attrs["retrain_of_trial"] == source.number
        metrics = trial_metrics(trial)
        assert len(metrics["val_loss"]) == 4 and sorted(trial.intermediate_values) == [1, 2, 3, 4]
        assert trial.value == metrics["val_loss"][-1]  # no early stopping: the last epoch
        # Seeded like the search: the first 3 epochs repeat the searched trial's curve (to float32
        # rounding: MKL picks its thread count per call on a loaded machine, which reorders sums).
        assert metrics["val_loss"][:3] == pytest.approx(trial_metrics(source)["val_loss"], rel=1e-5)

        folder = output / f"top{rank}"
        saved = torch.load(folder / "model.pt", weights_only=True)
        assert saved["source_trial"] == source.number and saved["epochs"] == 4
        config = DigitsConfig(**saved["config"])
        model = build_model(config)
        model.load_state_dict(saved["model"])  # the final model, ready to use
        assert config.lr == source.params["lr"]
        with (folder / "curves.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert [float(r["val_loss"]) for r in rows] == metrics["val_loss"]
        assert json.loads((folder / "curves.json").read_text())["metrics"] == metrics
        assert not (folder / "checkpoint").exists()
    status = _run(["status", "digits_quickstart/retrain", "--storage", storage])
    assert "complete=2" in status

    # --trial N: a chosen configuration (here the worst), published as artifact:STUDY#trialN.
    worst = ranked[-1]
    artifacts = tmp_path / "artifacts"
    args = ["retrain", "digits_quickstart", "--epochs", "2", "--trial", str(worst.number)]
    args += [
        "--storage",
        storage,
        "--output",
        str(output),
        "--device",
        "cpu",
        "--artifact-dir",
        str(artifacts),
    ]
    chosen = run_cli(args)
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    assert f"retrain trial{worst.number}: trial {worst.number} " in chosen.stdout
    saved = torch.load(output / f"trial{worst.number}" / "model.pt", weights_only=True)
    assert saved["source_trial"] == worst.number and saved["params"] == worst.params
    published = resolve_model_reference(f"artifact:digits_quickstart#trial{worst.number}", artifacts)
    assert torch.load(published, weights_only=True)["source_trial"] == worst.number
    with pytest.raises(HpoError, match="has no retrained top1 model"):  # only trialN was published there
        resolve_model_reference("artifact:digits_quickstart", artifacts)


@pytest.mark.slow
def test_report_000_chain_encoder_retrained_then_frozen_under_the_mlp(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Search the CelebA encoder, retrain the winner (the report took epoch 6), build the MLP on it."""
    celeba = make_celeba(tmp_path / "celeba", n=24, size=16)
    data = {"root": str(celeba), "image_size": 16}
    settings = {"pretrained": False, "batch_size": 8}
    encoder_file = _copy_study(
        ROOT / "studies" / "r000_celeba_resnet_encoder.yaml",
        tmp_path,
        data=data,
        settings=settings,
        budget={"max_epochs": 1},
    )
    common = ["--storage", sqlite_url, "--no-progress", "--checkpoint-dir", str(tmp_path / "ck")]
    _run(["worker", str(encoder_file), "--n-trials", "1", *common])
    output = tmp_path / "encoder"
    _run(
        [
            "retrain",
            "r000_celeba_resnet_encoder",
            "--epochs",
            "2",
            "--storage",
            sqlite_url,
            "--output",
            str(output),
        ]
    )
    encoder = output / "top1" / "model.pt"
    saved = torch.load(encoder, weights_only=True)
    assert saved["config"]["model"] == "resnet18" and saved["model"]["head.1.weight"].shape == (40, 512)

    mlp_file = _copy_study(
        ROOT / "studies" / "r000_celeba_resnet_mlp.yaml",
        tmp_path,
        data=data,
        settings={**settings, "encoder_checkpoint": str(encoder)},
        budget={"max_epochs": 1},
    )
    _run(["worker", str(mlp_file), "--n-trials", "1", *common])
    mlp_study = optuna.load_study(study_name="r000_celeba_resnet_mlp", storage=sqlite_url)
    (trial,) = [t for t in mlp_study.get_trials() if t.state.is_finished()]
    assert trial.state == TrialState.COMPLETE, trial.system_attrs.get("fail_reason")

    model = build_vision_model(
        ModelOptions(name="resnet18_mlp", num_outputs=1, transfer="features", encoder_checkpoint=str(encoder))
    )
    encoder_model: Any = model.backbone
    assert torch.equal(encoder_model.backbone.conv1.weight, saved["model"]["backbone.conv1.weight"])
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the encoder is frozen
    trunk: Any = model.trunk
    assert trunk.inp[0].in_features == 40  # the MLP reads the encoder's 40 attribute outputs


def test_objective_without_checkpoints_gets_curves_but_no_model(tmp_path: Path, sqlite_url: str) -> None:
    study = quadratic_study(tmp_path, n_trials=3, epochs=2, sampler="random")
    _run(["worker", str(study), "--storage", sqlite_url, "--no-progress"])
    stdout = _run(
        ["retrain", "quad", "--epochs", "5", "--storage", sqlite_url, "--output", str(tmp_path / "out")]
    )
    assert "no model (the objective wrote no checkpoint)" in stdout
    assert not (tmp_path / "out" / "top1" / "model.pt").exists()
    curves = json.loads((tmp_path / "out" / "top1" / "curves.json").read_text())
    assert len(curves["metrics"]["loss"]) == 5


def test_retrain_errors_are_one_line(tmp_path: Path, sqlite_url: str) -> None:
    missing = run_cli(["retrain", "nosuch", "--epochs", "3", "--storage", sqlite_url])
    assert missing.returncode == 2 and missing.stderr.startswith("error: no study named 'nosuch'")
    study = quadratic_study(tmp_path, n_trials=2)
    _run(["create-study", str(study), "--storage", sqlite_url])
    empty = run_cli(["retrain", "quad", "--epochs", "3", "--storage", sqlite_url])
    assert empty.returncode == 2 and "has no completed trial to retrain" in empty.stderr
    zero = run_cli(["retrain", "quad", "--epochs", "0", "--storage", sqlite_url])
    assert zero.returncode == 2 and "--epochs must be at least 1" in zero.stderr
    no_trial = run_cli(["retrain", "quad", "--epochs", "3", "--trial", "7", "--storage", sqlite_url])
    assert no_trial.returncode == 2 and "has no trial 7 with parameters to retrain" in no_trial.stderr
    for result in (missing, empty, zero, no_trial):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    both = run_cli(
        ["retrain", "quad", "--epochs", "3", "--top", "2", "--trial", "0", "--storage", sqlite_url]
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.mark.slow
def test_failing_configuration_is_recorded_and_exit_code_is_1(tmp_path: Path, sqlite_url: str) -> None:
    root = make_imagefolder(tmp_path / "images", classes=2, per_class=4, size=8)
    study = {
        "name": "moved",
        "objective": "image_classifier",
        "data": {"format": "imagefolder", "root": str(root), "image_size": 8},
        "settings": {"model": "mlp", "mlp_width": 8, "mlp_layers": 1, "batch_size": 4},
        "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 1,
        "budget": {"max_epochs": 1},
        "sampler": "random",
    }
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(study))
    _run(["worker", str(path), "--storage", sqlite_url, "--no-progress"])
    shutil.rmtree(root)  # the dataset moved away between the search and the retrain
    result = run_cli(
        ["retrain", "moved", "--epochs", "2", "--storage", sqlite_url, "--output", str(tmp_path / "o")]
    )
    assert result.returncode == 1
    assert "top1 FAILED: SpecError" in result.stdout and "retrained 0 of 1" in result.stdout
    (trial,) = optuna.load_study(study_name="moved/retrain", storage=sqlite_url).get_trials()
    assert trial.state == TrialState.FAIL
    assert f"data.root: {root} does not exist" in trial.system_attrs["fail_reason"]


def _retrain_trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials of the retrain study of ``name`` (none when it was never created)."""
    if f"{name}/retrain" not in optuna.get_all_study_names(url):
        return []
    return optuna.load_study(study_name=f"{name}/retrain", storage=url).get_trials()


def test_bad_output_locations_fail_before_training(tmp_path: Path, sqlite_url: str) -> None:
    """A bad --output or --artifact-dir ($HPO_ARTIFACT_DIR) is one error line, before anything
    trains or a retrain trial starts (it used to fail after training, the trial left RUNNING)."""
    study = quadratic_study(tmp_path, n_trials=1, epochs=1, sampler="random")
    _run(["worker", str(study), "--storage", sqlite_url, "--no-progress"])
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    retrain = ["retrain", "quad", "--epochs", "1", "--storage", sqlite_url, "--device", "cpu"]
    good_output = ["--output", str(tmp_path / "out")]
    cases = [
        (run_cli([*retrain, *good_output, "--artifact-dir", str(a_file)]), "--artifact-dir"),
        (
            run_cli(
                [*retrain, *good_output],
                env=cli_env({"HPO_ARTIFACT_DIR": str(a_file / "sub")}),
            ),
            "$HPO_ARTIFACT_DIR",
        ),
        (run_cli([*retrain, "--output", str(a_file)]), "--output"),
        (run_cli([*retrain, "--output", str(a_file / "sub")]), "--output"),
    ]
    for result, flag in cases:
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"(fix: {flag} " in result.stderr or f"or {flag} naming" in result.stderr, result.stderr
        assert "retrain top1" not in result.stdout  # nothing trained
    assert _retrain_trials(sqlite_url, "quad") == []  # no trial started, none left RUNNING
    assert a_file.read_text() == "not a folder\n"

    # A leftover file where the topR folder goes is replaced, as a leftover folder is.
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "top1").write_text("leftover\n")
    _run([*retrain, *good_output])
    assert (tmp_path / "out" / "top1" / "curves.json").is_file()
    assert [t.state for t in _retrain_trials(sqlite_url, "quad")] == [TrialState.COMPLETE]


BAD_CHECKPOINT = """
from hpo_test_objectives import quadratic


def train(run):
    \"\"\"quadratic, leaving a checkpoint.pt that is no torch checkpoint.\"\"\"
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (run.checkpoint_dir / "checkpoint.pt").write_bytes(b"not a torch checkpoint")
    return quadratic(run)
"""


def test_a_failure_after_training_leaves_the_retrain_trial_failed(tmp_path: Path, sqlite_url: str) -> None:
    """Whatever fails once a retrain trial started (here: its final checkpoint cannot be read)
    finishes the trial FAIL with the reason; it used to stay RUNNING forever."""
    (tmp_path / "hpo_badckpt_objectives.py").write_text(BAD_CHECKPOINT)
    study = quadratic_study(
        tmp_path, n_trials=1, epochs=1, sampler="random", objective="hpo_badckpt_objectives:train"
    )
    _run(["worker", str(study), "--storage", sqlite_url, "--no-progress"])
    args = ["retrain", "quad", "--epochs", "1", "--storage", sqlite_url, "--device", "cpu"]
    args += ["--output", str(tmp_path / "out"), "--objective-path", str(tmp_path)]
    result = run_cli(args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "top1 FAILED after training: UnpicklingError" in result.stdout, result.stdout
    assert "retrained 0 of 1" in result.stdout
    (trial,) = _retrain_trials(sqlite_url, "quad")
    assert trial.state == TrialState.FAIL
    assert trial.system_attrs["fail_reason"].startswith("UnpicklingError")
    assert sorted(trial.intermediate_values) == [1]  # the curve is kept
    assert (tmp_path / "out" / "top1" / "curves.json").is_file()


@pytest.mark.slow
def test_the_stored_study_name_names_the_model_and_the_retrain_study(tmp_path: Path, sqlite_url: str) -> None:
    """A study created with --study-name from a file named otherwise is published as
    artifact:STORED_NAME, never under the file's ``name:`` (which another study may share)."""
    study_file = _copy_study(
        ROOT / "studies" / "digits_quickstart.yaml",
        tmp_path,
        n_trials=1,
        budget={"max_epochs": 1},
        settings={"hidden_units": 16, "hidden_layers": 1},
    )
    _run(["create-study", str(study_file), "--study-name", "team/digits", "--storage", sqlite_url])
    _run(["worker", "--study-name", "team/digits", "--storage", sqlite_url, "--no-progress"])
    artifacts = tmp_path / "artifacts"
    stdout = _run(
        [
            "retrain",
            "team/digits",
            "--epochs",
            "1",
            "--storage",
            sqlite_url,
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "out"),
            "--artifact-dir",
            str(artifacts),
        ]
    )
    assert f"(artifact:team/digits in {artifacts})" in stdout, stdout
    published = resolve_model_reference("artifact:team/digits", artifacts)
    saved = torch.load(published, weights_only=True)
    assert saved["study"] == "team/digits" and saved["retrain_study"] == "team/digits/retrain"
    with pytest.raises(HpoError, match="has no retrained top1 model"):
        resolve_model_reference("artifact:digits_quickstart", artifacts)
    retrained = optuna.load_study(study_name="team/digits/retrain", storage=sqlite_url)
    assert (stored_definition(retrained) or {})["name"] == "team/digits/retrain"
    assert [t.state for t in retrained.get_trials()] == [TrialState.COMPLETE]
