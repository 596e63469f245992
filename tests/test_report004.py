"""Report 004 (Caltech101, AlexNet; VGG16/ResNet-50) as the report ran it.

Synthetic Caltech trees in the homework's layout (``101_ObjectCategories`` with
``BACKGROUND_Google`` and the ``train.txt``/``test.txt`` split lists), the report's validation split
(the training list halved, stratified), Resize + CenterCrop preprocessing, best- versus last-epoch
scoring with patience and threshold, the transfer modes' trainable parameters (random weights,
nothing downloaded), the missing-weights error coming before any decoding, and the study files.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pydantic
import pytest
import torch
import yaml
from conftest import ROOT
from PIL import Image
from synthetic_data import make_caltech101, make_imagefolder, nearest_class
from torchvision import transforms

from hpo.errors import HpoError, SpecError
from hpo.objective import EarlyStopping, TrialRun
from hpo.space import grid_points
from hpo.spec import EarlyStoppingSpec, load_study_file, parse_study
from objectives.vision import DataConfig, ImageData, load_image_data
from objectives.vision._formats import read_catalog
from objectives.vision.models import ModelOptions, build_model
from objectives.vision.train import train

PER_CLASS = [6, 9, 12]  # train list: 4, 6, 8 per class; test list: 2, 3, 4


@pytest.fixture(scope="module")
def caltech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_caltech101(tmp_path_factory.mktemp("caltech"), classes=3, per_class=PER_CLASS)


def load(seed: int = 0, test: bool = False, **options: Any) -> ImageData:
    return load_image_data(DataConfig(**options), seed=seed, workers=1, test=test)


def class_counts(targets: torch.Tensor) -> list[int]:
    counts = Counter(targets.tolist())
    return [counts[k] for k in range(max(counts) + 1)]


def assert_colours_match(images: torch.Tensor, targets: torch.Tensor, n_classes: int) -> None:
    for image, target in zip(images, targets, strict=True):
        assert nearest_class(image.numpy(), n_classes) == int(target)


# --------------------------------------------------------------------------- classes


def test_caltech_leaves_background_google_out_by_default(caltech: Path) -> None:
    data = load(format="caltech101", root=str(caltech), image_size=8)
    assert data.classes == ("class_0", "class_1", "class_2")
    assert len(data.train_targets) + len(data.val_targets) == sum(PER_CLASS)  # no background image
    assert_colours_match(data.train_images, data.train_targets, 3)


def test_exclude_classes_empty_keeps_the_background_and_a_name_drops_its_folder(caltech: Path) -> None:
    everything = load(format="caltech101", root=str(caltech), image_size=8, exclude_classes=[])
    assert everything.classes == ("BACKGROUND_Google", "class_0", "class_1", "class_2")
    assert len(everything.train_targets) + len(everything.val_targets) == sum(PER_CLASS) + 4
    # An explicit list replaces the default: the background is back, class_1 is gone.
    some = load(format="caltech101", root=str(caltech), image_size=8, exclude_classes=["class_1"])
    assert some.classes == ("BACKGROUND_Google", "class_0", "class_2")


def test_imagefolder_keeps_every_folder_unless_told(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "tree", classes=["a", "b", "c"], per_class=3, size=8)
    assert load(format="imagefolder", root=str(root), image_size=8).classes == ("a", "b", "c")
    data = load(format="imagefolder", root=str(root), image_size=8, exclude_classes=["b"])
    assert data.classes == ("a", "c")
    assert len(data.train_targets) + len(data.val_targets) == 6


def test_an_unknown_excluded_class_is_one_line_naming_the_field(caltech: Path) -> None:
    with pytest.raises(SpecError) as info:
        load(format="caltech101", root=str(caltech), exclude_classes=["Faces_easyy"])
    assert info.value.field == "data.exclude_classes"
    assert "Faces_easyy" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "voc", "exclude_classes": ["x"]}, "exclude_classes applies only"),
        ({"format": "imagefolder", "root": "x", "train_list": "train.txt"}, "train_list applies only"),
        ({"format": "caltech101", "test_list": "test.txt"}, "test_list needs train_list"),
        ({"format": "caltech101", "image_size": 224, "resize": 200}, "resize (200) must be at least"),
    ],
)
def test_options_that_do_not_fit_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=re.escape(message)):
        DataConfig(**options)


# --------------------------------------------------------------------------- split lists


def test_split_lists_give_train_halved_into_train_and_val_and_the_test_list(caltech: Path) -> None:
    options = {"format": "caltech101", "root": str(caltech), "image_size": 8, "val_fraction": 0.5}
    data = load(train_list="train.txt", test_list="test.txt", test=True, **options)
    assert data.classes == ("class_0", "class_1", "class_2")
    # Stratified halves of the training list (4, 6, 8 per class) ...
    assert class_counts(data.train_targets) == [2, 3, 4]
    assert class_counts(data.val_targets) == [2, 3, 4]
    # ... and the test list (2, 3, 4 per class) held out, background lines dropped.
    assert data.test_images is not None and data.test_targets is not None
    assert class_counts(data.test_targets) == [2, 3, 4]
    for images, targets in (
        (data.train_images, data.train_targets),
        (data.val_images, data.val_targets),
        (data.test_images, data.test_targets),
    ):
        assert_colours_match(images, targets, 3)
    # The test split is decoded only on request; the search's splits are the same either way.
    plain = load(train_list="train.txt", test_list="test.txt", **options)
    assert plain.test_images is None
    assert torch.equal(plain.val_images, data.val_images)


def test_train_and_val_come_from_the_train_list_only(caltech: Path) -> None:
    config = DataConfig(format="caltech101", root=str(caltech), train_list="train.txt", test_list="test.txt")
    catalog = read_catalog(config, caltech, "study file")
    listed = {line for line in (caltech / "train.txt").read_text().split() if "BACKGROUND" not in line}
    assert {str(Path(f).relative_to(caltech / "101_ObjectCategories")) for f in catalog.train.files} == listed
    assert catalog.val is None and catalog.test is not None
    assert not set(catalog.train.files) & set(catalog.test.files)


def test_the_split_depends_on_the_seed_only(caltech: Path) -> None:
    options = {"format": "caltech101", "root": str(caltech), "image_size": 8, "val_fraction": 0.5}
    options["train_list"] = "train.txt"
    first, again, other = load(0, **options), load(0, **options), load(1, **options)
    assert torch.equal(first.val_images, again.val_images)
    assert not torch.equal(first.val_images, other.val_images)


def test_split_list_errors_name_the_list_and_line(caltech: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("class_0/image_0001.jpg\nclass_0/image_0999.jpg\n")
    with pytest.raises(SpecError) as info:
        load(format="caltech101", root=str(caltech), train_list=str(bad))
    assert info.value.field == "data.train_list"
    assert "bad.txt:2" in str(info.value) and "image_0999.jpg" in str(info.value)
    bad.write_text("image_0001.jpg\n")
    with pytest.raises(SpecError, match=r"bad\.txt:1 is not '<class>/<image file>'"):
        load(format="caltech101", root=str(caltech), train_list=str(bad))
    with pytest.raises(SpecError, match=r"nothere\.txt does not exist") as info:
        load(format="caltech101", root=str(caltech), train_list="nothere.txt")
    assert info.value.field == "data.train_list"


# --------------------------------------------------------------------------- resize + crop


def test_resize_then_center_crop_matches_torchvision(tmp_path: Path) -> None:
    # A horizontal and vertical gradient, wider than tall: cropping and resizing give different
    # pixels, so the comparison tells Resize(20) + CenterCrop(16) from a plain resize to 16.
    height, width = 48, 64
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 4, ys * 5, (xs + ys) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    for category in ("one", "other"):  # two classes of the same two images: one is nothing to learn
        tree = tmp_path / "101_ObjectCategories" / category
        tree.mkdir(parents=True)
        for name in ("image_0001.png", "image_0002.png"):
            Image.fromarray(pixels).save(tree / name)
    reference = transforms.Compose(
        [transforms.Resize(20), transforms.CenterCrop(16), transforms.PILToTensor()]
    )
    expected = reference(Image.fromarray(pixels)).float()

    data = load(format="caltech101", root=str(tmp_path), image_size=16, resize=20)
    assert data.train_images.shape == (2, 3, 16, 16) and data.val_images.shape == (2, 3, 16, 16)
    cropped = data.train_images[0].float()
    plain = load(format="caltech101", root=str(tmp_path), image_size=16).train_images[0].float()
    assert (cropped - expected).abs().mean() < 2.0
    assert (plain - expected).abs().mean() > 4 * (cropped - expected).abs().mean()


# --------------------------------------------------------------------------- scoring


def feed(stopper: EarlyStopping, values: list[float]) -> int | None:
    for epoch, value in enumerate(values, start=1):
        if stopper.update(value):
            return epoch
    return None


@pytest.mark.parametrize(
    ("score", "direction", "expected"),
    [
        (None, "minimize", 0.7),  # no rule: the last epoch, as before
        ("last_epoch", "minimize", 0.7),
        ("best_epoch", "minimize", 0.5),
        ("best_epoch", "maximize", 1.0),
    ],
)
def test_score_best_or_last_epoch(score: str | None, direction: str, expected: float) -> None:
    stopper = EarlyStopping(EarlyStoppingSpec(score=score), direction)  # type: ignore[arg-type]
    assert feed(stopper, [1.0, 0.5, 0.7]) is None
    assert stopper.result() == expected


def test_patience_and_threshold_stop_and_best_epoch_scores_the_lowest() -> None:
    # Report 004, section 2: stop after `patience` epochs without an improvement larger than the
    # threshold (min_delta). 0.795 improves on 0.8 by less than 0.01, so it does not reset patience.
    values = [1.0, 0.8, 0.795, 0.9, 0.85, 0.1]
    rule = EarlyStoppingSpec(rule="patience", patience=2, min_delta=0.01)
    assert feed(EarlyStopping(rule, "minimize"), values) == 4
    rule_own = EarlyStopping(rule, "minimize")
    feed(rule_own, values)
    assert rule_own.result() == 0.8  # the epoch of the last improvement beyond the threshold
    best = EarlyStopping(rule.model_copy(update={"score": "best_epoch"}), "minimize")
    assert feed(best, values) == 4
    assert best.result() == 0.795  # the best epoch seen, as the report kept it
    without_threshold = EarlyStopping(EarlyStoppingSpec(rule="patience", patience=2), "minimize")
    assert feed(without_threshold, values) == 5  # 0.795 counts as an improvement now


STUDY = """
name: scoring
objective: image_classifier
search_space: {lr: {type: float, low: 0.001, high: 0.1}}
metric: val_loss
direction: minimize
n_trials: 1
budget: {max_epochs: 3}
sampler: random
"""


def test_trial_value_is_the_best_epoch_through_trial_run(tmp_path: Path) -> None:
    raw = yaml.safe_load(STUDY)
    values = {"best_epoch": 0.5, "last_epoch": 0.7}
    for score, expected in values.items():
        spec = parse_study({**raw, "early_stopping": {"score": score}}, "study.yaml")
        trial = optuna.create_study().ask()
        run = TrialRun(trial, spec, {"lr": 0.01}, 3, "cpu", tmp_path, {})
        for epoch, value in enumerate([1.0, 0.5, 0.7], start=1):
            assert run.report(epoch, {"val_loss": value}) is False
        assert run.final_value() == expected


def test_score_is_checked_and_left_out_of_definitions_that_do_not_set_it() -> None:
    raw = yaml.safe_load(STUDY)
    with pytest.raises(SpecError) as info:
        parse_study({**raw, "early_stopping": {"score": "best"}}, "study.yaml")
    assert info.value.field == "early_stopping.score"
    plain = parse_study(raw, "study.yaml").definition()
    assert "score" not in plain["early_stopping"]  # definitions stored before it still match
    scored = parse_study({**raw, "early_stopping": {"score": "best_epoch"}}, "study.yaml").definition()
    assert scored["early_stopping"]["score"] == "best_epoch"


def test_objective_scores_the_best_epoch_and_reports_the_test_list(caltech: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(STUDY)
    raw["data"] = {
        "format": "caltech101",
        "root": str(caltech),
        "image_size": 8,
        "train_list": "train.txt",
        "test_list": "test.txt",
        "val_fraction": 0.5,
    }
    raw["settings"] = {
        "model": "mlp",
        "mlp_layers": 2,
        "mlp_width": 16,
        "batch_size": 4,
        "test_metrics": True,
    }
    raw["early_stopping"] = {"score": "best_epoch"}
    spec = parse_study(raw, "study.yaml")
    run = TrialRun(optuna.create_study().ask(), spec, {"lr": 0.05}, 4, "cpu", tmp_path / "ckpt", {})
    value = train(run)
    history = run.history
    assert value == min(history["val_loss"])  # the best epoch, not necessarily the last
    assert len(history["test_acc"]) == len(history["val_acc"]) == 4
    assert all(0.0 <= a <= 1.0 for a in history["test_acc"] + history["test_top5"])
    assert all(loss > 0 for loss in history["test_loss"])

    raw["data"] = {"format": "caltech101", "root": str(caltech), "image_size": 8}  # no test list
    run = TrialRun(
        optuna.create_study().ask(), parse_study(raw, "s.yaml"), {"lr": 0.05}, 1, "cpu", tmp_path, {}
    )
    with pytest.raises(HpoError, match="test_metrics: true needs a held-out test split"):
        train(run)


# --------------------------------------------------------------------------- transfer modes

# AlexNet with 101 classes: convolutions 2,469,696; hidden FC layers 54,534,144; new last layer
# 4096 * 101 + 101 = 413,797 (57,417,637 in all).
ALEXNET_TRAINABLE = {
    "scratch": 57_417_637,
    "finetune": 57_417_637,
    "features": 54_534_144 + 413_797,  # frozen convolutions (3.2.2)
    "classifier": 2_469_696 + 413_797,  # all FC frozen except the new last layer (3.2.3)
    "classifier_all": 2_469_696,  # all FC frozen, the new last layer included (3.2.3)
}


@pytest.mark.parametrize(("transfer", "trainable"), ALEXNET_TRAINABLE.items())
def test_alexnet_trainable_parameters_per_transfer_mode(transfer: str, trainable: int) -> None:
    model = build_model(ModelOptions(name="alexnet", num_outputs=101, transfer=transfer))  # type: ignore[arg-type]
    assert sum(p.numel() for p in model.trainable_parameters()) == trainable
    frozen_head = transfer == "classifier_all"
    assert model.last_layer.weight.requires_grad is not frozen_head


def test_all_fc_frozen_keeps_the_random_last_layer_fixed_while_convolutions_learn() -> None:
    torch.manual_seed(0)
    model = build_model(ModelOptions(name="alexnet", num_outputs=4, transfer="classifier_all"))
    head_before = model.last_layer.weight.detach().clone()
    conv_before = model.backbone.features[0].weight.detach().clone()  # type: ignore[index]
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.arange(4))
    loss.backward()
    optimizer.step()
    assert torch.equal(model.last_layer.weight, head_before)
    assert not torch.equal(model.backbone.features[0].weight, conv_before)  # type: ignore[index]


def test_vgg16_all_fc_frozen_trains_the_convolutions_only() -> None:
    model = build_model(ModelOptions(name="vgg16", num_outputs=101, transfer="classifier_all"))
    assert sum(p.numel() for p in model.trainable_parameters()) == 14_714_688  # VGG16's 13 convolutions


def test_all_fc_frozen_needs_hidden_fc_layers() -> None:
    with pytest.raises(HpoError, match="transfer: classifier_all freezes"):
        build_model(ModelOptions(name="resnet18", num_outputs=3, transfer="classifier_all"))


# --------------------------------------------------------------------------- missing weights


def test_missing_weights_are_reported_before_the_dataset_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-cache"))
    root = make_caltech101(tmp_path / "caltech", classes=2, per_class=3, background=0)
    # An image that cannot be decoded: decoding first would fail with a SpecError about it.
    (root / "101_ObjectCategories" / "class_0" / "image_0001.jpg").write_bytes(b"not a jpeg")
    raw = yaml.safe_load(STUDY)
    raw["data"] = {"format": "caltech101", "root": str(root), "image_size": 64}
    raw["settings"] = {"model": "alexnet", "transfer": "finetune"}
    spec = parse_study(raw, "study.yaml")
    run = TrialRun(optuna.create_study().ask(), spec, {"lr": 0.01}, 1, "cpu", tmp_path / "ckpt", {})
    with pytest.raises(HpoError, match="pretrained weights for alexnet are not in the local torch cache"):
        train(run)
    # Without pretrained weights the same data does get decoded, and fails on the bad image.
    raw["settings"] = {"model": "alexnet", "transfer": "finetune", "pretrained": False}
    run = TrialRun(
        optuna.create_study().ask(), parse_study(raw, "s.yaml"), {"lr": 0.01}, 1, "cpu", tmp_path, {}
    )
    with pytest.raises(SpecError, match=r"image_0001\.jpg"):
        train(run)


# --------------------------------------------------------------------------- study files

R004 = sorted((ROOT / "studies").glob("r004_*.yaml"))


@pytest.mark.parametrize("path", R004, ids=lambda p: p.stem)
def test_r004_study_files_read_caltech_as_the_report_did(path: Path) -> None:
    text = path.read_text()
    assert re.match(r"# Report 004, section 3\.\d(\.\d)?.*[Tt]able", text.splitlines()[0] + text), path
    spec = load_study_file(path)
    data = spec.data
    assert data["format"] == "caltech101"
    assert (data["train_list"], data["test_list"], data["val_fraction"]) == ("train.txt", "test.txt", 0.5)
    assert (data["resize"], data["image_size"]) == (256, 224)
    assert spec.metric == "val_loss" and spec.direction == "minimize"
    assert spec.early_stopping.score == "best_epoch"
    assert spec.settings["test_metrics"] is True  # the tables' Test Accuracy column
    assert (spec.early_stopping.rule, spec.early_stopping.patience) == ("patience", 5)


def grid(name: str) -> list[dict[str, Any]]:
    spec = load_study_file(ROOT / "studies" / f"{name}.yaml")
    return [{**spec.settings, **point} for point in grid_points(spec.space)]


def test_section_3_2_grids_are_the_reports_tables_7_to_9() -> None:
    finetune_sgd = grid("r004_caltech_finetune_sgd")  # table 7: SGD and NAG
    assert len(finetune_sgd) == 18
    assert {(p["nesterov"], p["lr"], p["weight_decay"]) for p in finetune_sgd} >= {
        (False, 5e-3, 5e-4),
        (True, 5e-3, 5e-5),
    }
    finetune_adamw = grid("r004_caltech_finetune_adamw")
    assert sorted({p["lr"] for p in finetune_adamw}) == [1e-5, 5e-5, 1e-4]
    features_adamw = grid("r004_caltech_features_adamw")  # table 8
    assert sorted({p["lr"] for p in features_adamw}) == [5e-5, 1e-4, 5e-4]
    assert {p["transfer"] for p in features_adamw} == {"features"}
    fc_frozen = grid("r004_caltech_fc_frozen_sgd") + grid("r004_caltech_fc_frozen_adamw")  # table 9
    assert len(fc_frozen) == 12
    assert {p["transfer"] for p in fc_frozen} == {"classifier", "classifier_all"}


def test_section_3_3_reuses_each_optimizers_best_setting_per_transfer_mode() -> None:
    runs = set()
    for path in sorted((ROOT / "studies").glob("r004_caltech_augment_*.yaml")):
        for point in grid(path.stem):
            key = (point["transfer"], point["optimizer"], point.get("nesterov", False))
            runs.add((*key, point["lr"], point["weight_decay"], point["augment"]))
    best = {  # tables 10-12
        ("finetune", "sgd", False, 5e-3, 5e-4),
        ("finetune", "sgd", True, 5e-3, 5e-5),
        ("finetune", "adamw", False, 1e-4, 5e-5),
        ("features", "sgd", False, 5e-3, 5e-3),
        ("features", "sgd", True, 1e-2, 5e-3),
        ("features", "adamw", False, 5e-5, 5e-3),
    }
    presets = ("flip_jitter", "flip_rotation", "flip_jitter_rotation")
    assert runs == {(*b, a) for b in best for a in presets}


def test_section_3_4_is_bohb_per_transfer_mode_with_a_30_epoch_budget() -> None:
    paths = sorted((ROOT / "studies").glob("r004_caltech_*_bohb_*.yaml"))
    assert [p.stem for p in paths] == [
        "r004_caltech_resnet50_bohb_features",
        "r004_caltech_resnet50_bohb_finetune",
        "r004_caltech_vgg16_bohb_features",
        "r004_caltech_vgg16_bohb_finetune",
    ]
    for path in paths:
        spec = load_study_file(path)
        assert spec.sampler.name == "bohb" and spec.budget.max_epochs == 30
        assert spec.budget.min_epochs == 3 and spec.sampler.options["eta"] == 3  # BOHB: 3.3, 10, 30 epochs
        assert spec.settings["transfer"] == path.stem.rsplit("_", 1)[1]
        assert "transfer" not in spec.space.names
