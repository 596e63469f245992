"""The reports' own settings as a study's first trials (``enqueue:``), and models kept in the
artifact store (``encoder_checkpoint: artifact:STUDY``).

* ``enqueue:`` through the real CLI: ``hpo create-study`` twice, and two at once on PostgreSQL,
  queue each point exactly once, as the first trials; a bad point is a one-line error naming the
  file and the field; grid studies refuse it.
* Report 000's chain with the encoder in the artifact store: the encoder study searched and
  retrained, then the MLP study's worker started in another directory finds the encoder through
  ``$HPO_ARTIFACT_DIR`` alone; without it, the trial says which study to retrain, and how.
* Report 002's scene classifier initialised from a pretext model: the backbone comes from the saved
  model, the pretext head does not.

Every study file loading, and one short trial of each through ``hpo worker``, is in
test_vision_studies.py (it covers every ``studies/r00*.yaml``, the new ones included).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from conftest import ROOT, cli_env, run_cli, start_cli
from optuna.trial import TrialState
from studyfiles import quadratic_study
from synthetic_data import make_celeba

from hpo.artifacts import publish_model, resolve_model_reference
from hpo.cli import main
from hpo.errors import HpoError, SpecError
from hpo.spec import load_study_file
from objectives.vision.models import ModelOptions, build_model, check_pretrained_weights

POINT = {"x": 1.5, "y": -2.0}


def _with_enqueue(path: Path, points: Any) -> Path:
    path.write_text(path.read_text() + yaml.safe_dump({"enqueue": points}))
    return path


def _fixed(study: optuna.Study) -> list[dict[str, Any]]:
    return [t.system_attrs["fixed_params"] for t in study.get_trials() if t.system_attrs.get("fixed_params")]


# --------------------------------------------------------------------------- enqueue


def test_enqueued_points_are_the_first_trials_and_queued_once(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_file = _with_enqueue(quadratic_study(tmp_path, n_trials=4), [POINT, {"x": 0, "y": 3}])
    args = ["create-study", str(study_file), "--storage", sqlite_url, "--skip-if-exists"]
    result = run_cli(args)
    assert result.returncode == 0 and "created" in result.stdout, result.stderr
    assert main(args) == 0  # again: the study exists, nothing is queued twice
    study = optuna.load_study(study_name="quad", storage=sqlite_url)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.WAITING for t in trials)
    # Ints are normalised to floats for float parameters, so the stored points compare equal.
    assert [t.system_attrs.get("fixed_params") for t in trials[:2]] == [POINT, {"x": 0.0, "y": 3.0}]
    assert not any(t.system_attrs.get("fixed_params") for t in trials[2:])
    assert trials[0].user_attrs["enqueued_from"] == "study file"

    # A worker (the CLI's entry point, in this process) runs them first, with exactly those parameters.
    monkeypatch.setenv("HPO_ALLOW_OBJECTIVES", "hpo_test_objectives")
    assert main(["worker", str(study_file), "--storage", sqlite_url, "--n-trials", "2", "--no-progress"]) == 0
    done = optuna.load_study(study_name="quad", storage=sqlite_url).get_trials()
    assert [t.params for t in done[:2]] == [POINT, {"x": 0.0, "y": 3.0}]
    assert [t.state for t in done[:2]] == [TrialState.COMPLETE] * 2


@pytest.mark.postgres
def test_two_concurrent_create_study_enqueue_once_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    study_file = _with_enqueue(quadratic_study(tmp_path, n_trials=5), [POINT])
    args = ["create-study", str(study_file), "--storage", postgres_url, "--skip-if-exists"]
    procs = [start_cli(args), start_cli(args)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("created" in out for out in outputs) == 1, outputs
    study = optuna.load_study(study_name="quad", storage=postgres_url)
    assert len(study.get_trials()) == 5
    assert _fixed(study) == [POINT]
    assert study.get_trials()[0].system_attrs["fixed_params"] == POINT


@pytest.mark.parametrize(
    ("points", "field", "says"),
    [
        ([{"x": 9.0, "y": 0.0}], "enqueue[0]", "x=9.0 is outside the search space"),
        ([{"x": 1.0}], "enqueue[0]", "parameter 'y' is missing"),
        (
            [POINT, {"x": 1.0, "y": 0.0, "z": 1}],
            "enqueue[1]",
            "parameter 'z' is not in the study's search space",
        ),
        ([POINT, POINT], "enqueue[1]", "repeats enqueue[0]"),
        ({"x": 1.0, "y": 0.0}, "enqueue", "must be a non-empty list of configurations"),
        ([POINT] * 1 + [{"x": float(i), "y": 0.0} for i in range(4)], "enqueue", "n_trials is 4"),
    ],
)
def test_a_bad_point_is_a_one_line_error_naming_file_and_field(
    tmp_path: Path, points: Any, field: str, says: str
) -> None:
    study_file = _with_enqueue(quadratic_study(tmp_path, n_trials=4), points)
    with pytest.raises(SpecError) as caught:
        load_study_file(study_file)
    text = str(caught.value)
    assert text.startswith(f"{study_file}: {field}: ") and says in text and "(fix: " in text
    assert "\n" not in text


def test_a_bad_point_through_the_cli_writes_nothing(tmp_path: Path, sqlite_url: str) -> None:
    study_file = _with_enqueue(quadratic_study(tmp_path, n_trials=4), [{"x": 9.0, "y": 0.0}])
    result = run_cli(["create-study", str(study_file), "--storage", sqlite_url])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {study_file}: enqueue[0]: x=9.0 is outside the search space (fix: use a value in [-5.0, 5.0])"
    ]
    assert optuna.get_all_study_names(storage=sqlite_url) == []


def test_grid_studies_refuse_enqueue(tmp_path: Path) -> None:
    study_file = _with_enqueue(
        quadratic_study(tmp_path, sampler="grid", n_trials=None, grid_x=[0.0, 1.0], grid_y=[0.0]), [POINT]
    )
    with pytest.raises(SpecError, match=r"enqueue: a grid study already queues every grid point"):
        load_study_file(study_file)


def test_a_definition_without_enqueue_is_unchanged(tmp_path: Path) -> None:
    # Definitions stored before enqueue existed have no such key; they must still match the file.
    spec = load_study_file(quadratic_study(tmp_path))
    assert "enqueue" not in spec.definition()
    with_points = load_study_file(_with_enqueue(quadratic_study(tmp_path, name="q2"), [POINT]))
    assert with_points.definition()["enqueue"] == [POINT]


# --------------------------------------------------------------------------- models by reference


def test_relative_checkpoint_paths_are_relative_to_the_study_file(tmp_path: Path) -> None:
    folder = tmp_path / "studies"
    folder.mkdir()
    raw = yaml.safe_load((ROOT / "studies" / "r000_celeba_resnet_mlp.yaml").read_text())
    raw["search_space"] = str(ROOT / "search_spaces" / "r000_adamw_exponential.yaml")
    raw["settings"]["encoder_checkpoint"] = "../models/encoder.pt"
    path = folder / "mlp.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_study_file(path)
    assert spec.settings["encoder_checkpoint"] == str((tmp_path / "models" / "encoder.pt").resolve())
    raw["settings"]["encoder_checkpoint"] = "artifact:r000_celeba_resnet_encoder"  # left as written
    path.write_text(yaml.safe_dump(raw))
    assert load_study_file(path).settings["encoder_checkpoint"] == "artifact:r000_celeba_resnet_encoder"


def test_missing_model_reference_names_the_study_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(HpoError) as caught:
        resolve_model_reference("artifact:r002_scene15_rotation_pretext", tmp_path)
    text = str(caught.value)
    assert "study 'r002_scene15_rotation_pretext' has no retrained top1 model" in text
    assert "hpo retrain r002_scene15_rotation_pretext --epochs N" in text
    with pytest.raises(HpoError, match="is not a model reference"):
        resolve_model_reference("artifact:x#topzero", tmp_path)


def test_scene_classifier_starts_from_the_pretext_models_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Report 002: EfficientNet-B0 trained on rotation (4 classes), its features frozen under a new
    15-class head; the model found as artifact:STUDY, as a worker would (``$HPO_ARTIFACT_DIR``)."""
    torch.manual_seed(1)
    pretext = build_model(ModelOptions(name="efficientnet_b0", num_outputs=4, dropout=0.2))
    saved = tmp_path / "model.pt"
    torch.save({"model": pretext.state_dict(), "config": {"model": "efficientnet_b0"}}, saved)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copy(saved, artifacts / "0123-abcd")
    publish_model(artifacts, "r002_scene15_rotation_pretext", "trial0", "0123-abcd", {"epochs": 15})
    monkeypatch.setenv("HPO_ARTIFACT_DIR", str(artifacts))

    reference = "artifact:r002_scene15_rotation_pretext#trial0"  # as r002_scene15_after_rotation names it
    options = ModelOptions(
        name="efficientnet_b0",
        num_outputs=15,
        transfer="features",
        pretrained=True,  # ImageNet's file is not needed: the weights come from the pretext model
        dropout=0.2,
        encoder_checkpoint=reference,
    )
    scene = build_model(options)
    for name, value in pretext.backbone.state_dict().items():
        assert torch.equal(scene.backbone.state_dict()[name], value), name
    assert scene.last_layer.out_features == 15
    assert not any(p.requires_grad for p in scene.backbone.parameters())
    assert all(p.requires_grad for p in scene.head.parameters())

    # A saved model of another architecture is refused with the reason.
    with pytest.raises(
        HpoError, match=r"is not a saved resnet18 image_classifier \(it is a efficientnet_b0\)"
    ):
        build_model(ModelOptions(name="resnet18", num_outputs=3, encoder_checkpoint=reference))


# --------------------------------------------------------------------------- report 000's chain


def _study_copy(name: str, directory: Path, data: dict[str, Any], **settings: Any) -> Path:
    raw = yaml.safe_load((ROOT / "studies" / f"{name}.yaml").read_text())
    raw["search_space"] = str((ROOT / "search_spaces" / "r000_adamw_exponential.yaml").resolve())
    raw["data"] = {**raw["data"], **data}
    raw["settings"] = {**raw["settings"], **settings}
    raw.update(budget={"max_epochs": 1}, n_trials=2)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_report_000_encoder_reaches_a_worker_elsewhere_through_the_artifact_store(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    celeba = make_celeba(tmp_path / "celeba", n=24, size=16)
    data = {"root": str(celeba), "image_size": 16}
    artifacts = tmp_path / "shared-artifacts"
    here, elsewhere = tmp_path / "machine-a", tmp_path / "machine-b"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HPO_ARTIFACT_DIR", str(artifacts))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    common = ["--storage", sqlite_url, "--no-progress", "--n-trials", "1"]
    mlp_file = _study_copy("r000_celeba_resnet_mlp", elsewhere, data, pretrained=False, batch_size=8)
    spec = load_study_file(mlp_file)
    assert spec.settings["encoder_checkpoint"] == "artifact:r000_celeba_resnet_encoder#trial0"
    assert spec.enqueue == ({"lr": 1e-3, "weight_decay": 1e-2, "gamma": 0.95},)

    # Before the encoder is retrained, the objective's first check (before any image is decoded)
    # names the study and the command that stores it.
    with pytest.raises(HpoError, match=r"hpo retrain r000_celeba_resnet_encoder --epochs N --trial 0"):
        check_pretrained_weights("resnet18_mlp", False, "artifact:r000_celeba_resnet_encoder#trial0")

    # Machine A: search the encoder (its first trial is the report's point) and retrain it, through
    # the CLI's entry point in this process (the same code as the hpo script).
    monkeypatch.chdir(here)
    encoder_file = _study_copy("r000_celeba_resnet_encoder", here, data, pretrained=False, batch_size=8)
    assert main(["worker", str(encoder_file), *common]) == 0
    encoder_study = optuna.load_study(study_name="r000_celeba_resnet_encoder", storage=sqlite_url)
    assert encoder_study.get_trials()[0].params == {"lr": 1e-3, "weight_decay": 1e-2, "gamma": 0.95}
    retrain = ["retrain", "r000_celeba_resnet_encoder", "--epochs", "1", "--trial", "0"]
    assert main([*retrain, "--storage", sqlite_url]) == 0
    retrained = optuna.load_study(study_name="r000_celeba_resnet_encoder/retrain", storage=sqlite_url)
    assert any(
        k.startswith("artifacts:") for k in retrained.get_trials()[0].system_attrs
    )  # dashboard lists it
    shutil.rmtree(here / "storage")  # machine A's local files (storage/retrain/...) are not what B reads
    model_file = resolve_model_reference("artifact:r000_celeba_resnet_encoder#trial0", artifacts)
    saved = torch.load(model_file, weights_only=True)
    assert saved["study"] == "r000_celeba_resnet_encoder" and saved["config"]["model"] == "resnet18"

    # Machine B: a worker process started in another directory, given only the storage URL and the
    # shared artifact folder, runs the MLP on that encoder.
    env = cli_env({"HPO_ARTIFACT_DIR": str(artifacts)})
    result = run_cli(["worker", str(mlp_file), *common], cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = optuna.load_study(study_name=spec.name, storage=sqlite_url).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 1, [t.system_attrs.get("fail_reason") for t in trials]
    assert done[0].params == {"lr": 1e-3, "weight_decay": 1e-2, "gamma": 0.95}
