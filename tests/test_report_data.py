"""The reports' data as the reports read it (issue 12's data items).

Synthetic trees in the real layouts: CelebA's archive layout (``Img/``, ``Anno/``, ``Eval/``),
STL-10's binary files written with numpy in the dataset's column-major byte order, VOC annotations
with ``difficult`` objects; report 000's attribute-only loading (no image decoded), report 002's
pretext tasks (labels and pixels checked exactly), and one short ``hpo worker`` trial each on a
tiny STL-10 and a tiny pretext study.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pydantic
import pytest
import torch
import yaml
from conftest import ROOT, start_cli
from PIL import Image
from synthetic_data import make_celeba, make_imagefolder

from hpo.errors import HpoError, SpecError
from hpo.objective import TrialRun
from hpo.spec import parse_study
from objectives.vision import VOC_CLASSES, DataConfig, ImageData, load_image_data
from objectives.vision._decode import decode_images, decoded_files
from objectives.vision._pretext import PERTURBATION_CLASSES, ROTATION_CLASSES, square_side
from objectives.vision.metrics import average_precision
from objectives.vision.train import ImageClassifierConfig, make_inputs, train


def load(seed: int = 0, **options: Any) -> ImageData:
    return load_image_data(DataConfig(**options), seed=seed, workers=1)


# --- CelebA: the archive's own layout ------------------------------------------------------------


def archive_layout(flat: Path, root: Path) -> Path:
    """CelebA as its archive ships: Img/img_align_celeba/, Anno/list_attr_celeba.txt, Eval/..."""
    (root / "Img").mkdir(parents=True)
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    shutil.copytree(flat / "img_align_celeba", root / "Img" / "img_align_celeba")
    shutil.copy(flat / "list_attr_celeba.txt", root / "Anno")
    shutil.copy(flat / "list_eval_partition.txt", root / "Eval")
    return root


@pytest.fixture(scope="module")
def celeba(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("celeba")
    flat = make_celeba(base / "flat", n=20, size=40)
    return flat, archive_layout(flat, base / "archive")


def test_celeba_archive_layout_reads_the_same_as_the_flat_one(celeba: tuple[Path, Path]) -> None:
    flat, archive = celeba
    a = load(format="celeba", root=str(flat), image_size=16)
    b = load(format="celeba", root=str(archive), image_size=16)
    assert len(b.train_targets) == 12 and len(b.val_targets) == 4  # partitions 0 and 1 of Eval/
    for name in ("train_images", "train_targets", "val_images", "val_targets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_celeba_without_either_layout_names_both(tmp_path: Path, celeba: tuple[Path, Path]) -> None:
    with pytest.raises(SpecError) as caught:
        load(format="celeba", root=str(tmp_path))
    text = str(caught.value)
    assert f"{tmp_path}/list_attr_celeba.txt (flat layout)" in text
    assert f"{tmp_path}/Anno/list_attr_celeba.txt (the archive's layout)" in text
    assert "fix: put list_attr_celeba.txt next to img_align_celeba/" in text
    # The annotations are there but the image archive was not unzipped: say so, and where.
    root = tmp_path / "zipped"
    shutil.copytree(celeba[1] / "Anno", root / "Anno")
    (root / "Img").mkdir()
    (root / "Img" / "img_align_celeba.zip").write_bytes(b"PK")
    with pytest.raises(
        SpecError, match=r"Img/img_align_celeba.zip is not unzipped.*unzip img_align_celeba.zip"
    ):
        load(format="celeba", root=str(root))


# --- CelebA: the attribute MLP's inputs, no image decoded ----------------------------------------


def test_attribute_inputs_decode_no_image(tmp_path: Path, celeba: tuple[Path, Path]) -> None:
    reference = load(format="celeba", root=str(celeba[0]), image_size=8)
    root = archive_layout(celeba[0], tmp_path / "c")
    for image in (root / "Img" / "img_align_celeba").iterdir():
        image.write_bytes(b"not a jpeg")  # any decode would fail
    before = decoded_files()
    data = load(format="celeba", root=str(root), inputs="attributes")
    assert decoded_files() == before
    assert not data.has_images and data.train_images.shape == (12, 0, 0, 0)
    assert torch.equal(data.train_targets, reference.train_targets)
    assert torch.equal(data.val_targets, reference.val_targets)
    shutil.rmtree(root / "Img")  # the image folder is not even needed
    assert torch.equal(
        load(format="celeba", root=str(root), inputs="attributes").val_targets, reference.val_targets
    )
    # With images, the same corrupt files are an error: the check above is not vacuous.
    archive_layout(celeba[0], tmp_path / "d")
    (tmp_path / "d" / "Img" / "img_align_celeba" / "000001.jpg").write_bytes(b"x")
    with pytest.raises(SpecError, match=r"000001\.jpg: cannot decode image"):
        load(format="celeba", root=str(tmp_path / "d"), image_size=8)


@pytest.mark.parametrize("model", ["resnet18", "mlp"])
def test_an_image_model_on_attributes_only_is_refused(celeba: tuple[Path, Path], model: str) -> None:
    data = load(format="celeba", root=str(celeba[0]), inputs="attributes")
    with pytest.raises(HpoError) as error:
        make_inputs(ImageClassifierConfig(model=model), data)
    assert str(error.value) == (
        f"model {model} needs images, but data.inputs is attributes "
        "(fix: data.inputs: images, or model: attribute_mlp)"
    )
    inputs = make_inputs(ImageClassifierConfig(model="attribute_mlp", target_attribute="Smiling"), data)
    assert not inputs.images and inputs.train_x.shape == (12, 39)


def test_r000_attribute_mlp_study_trains_without_decoding_an_image(
    tmp_path: Path, celeba: tuple[Path, Path]
) -> None:
    study_file = ROOT / "studies" / "r000_celeba_attribute_mlp.yaml"
    raw = yaml.safe_load(study_file.read_text())
    assert raw["data"] == {"format": "celeba", "inputs": "attributes"}
    root = archive_layout(celeba[0], tmp_path / "c")
    for image in (root / "Img" / "img_align_celeba").iterdir():
        image.write_bytes(b"not a jpeg")
    raw["data"]["root"] = str(root)
    raw["search_space"] = yaml.safe_load((study_file.parent / raw["search_space"]).read_text())
    spec = parse_study(raw, str(study_file))
    before = decoded_files()
    value = train(
        TrialRun(
            trial=optuna.create_study().ask(),
            spec=spec,
            params={"lr": 1e-3, "weight_decay": 1e-2, "gamma": 0.95},
            max_epochs=1,
            device="cpu",
            checkpoint_dir=tmp_path / "ckpt",
            cache={},
        )
    )
    assert np.isfinite(value) and decoded_files() == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"format": "celeba", "inputs": "attributes", "image_size": 8},
            "image_size does not apply with inputs",
        ),
        ({"format": "celeba", "inputs": "attributes", "pretext": "rotation"}, "pretext needs images"),
        ({"format": "voc", "inputs": "attributes"}, "inputs applies only to format celeba"),
        ({"format": "celeba", "voc_difficult": "ignore"}, "voc_difficult applies only to format voc"),
        ({"format": "digits", "perturbation_size": 0.5}, "perturbation_size applies only to pretext"),
        ({"format": "digits", "pretext": "jigsaw"}, "pretext"),
        (
            {"format": "stl10", "unlabeled": True},
            "unlabeled applies only to format stl10 with a pretext task",
        ),
        (
            {"format": "digits", "pretext": "rotation", "unlabeled": True},
            "unlabeled applies only to format stl10",
        ),
    ],
)
def test_options_that_do_not_fit_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        DataConfig(**options)


# --- STL-10 binaries -----------------------------------------------------------------------------

STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def hand_made(k: int) -> np.ndarray:
    """(96, 96, 3) RGB image k: a red top half, a green bar in columns 0..9 and a blue pixel at
    row 70, column 20 + k, so rows and columns cannot be mistaken for each other."""
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    image[:48, :, 0] = 200
    image[:, :10, 1] = 150
    image[70, 20 + k, 2] = 255
    return image


def write_stl10(root: Path, train_labels: list[int], test_labels: list[int], unlabeled: int = 0) -> Path:
    """STL-10's files: each image's bytes channel by channel, each channel column by column.
    Images are ``hand_made(k)`` with k counting train, test, then ``unlabeled`` ones."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    serial = 0
    for split, labels in (("train", train_labels), ("test", test_labels)):
        with open(folder / f"{split}_X.bin", "wb") as x:
            for _ in labels:
                x.write(hand_made(serial).transpose(2, 1, 0).tobytes())  # (C, W, H): column-major
                serial += 1
        np.asarray(labels, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    with open(folder / "unlabeled_X.bin", "wb") as x:
        if not unlabeled:
            x.write(b"\x00")  # malformed on purpose: must not be read unless asked for
        for k in range(serial, serial + unlabeled):
            x.write(hand_made(k).transpose(2, 1, 0).tobytes())
    return root


def test_stl10_binaries_are_transposed_and_labelled_from_zero(tmp_path: Path) -> None:
    root = write_stl10(tmp_path, [1, 2, 10, 3], [10, 1])
    data = load(format="stl10", root=str(root), image_size=96)
    assert data.classes == tuple(STL_CLASSES) and data.task == "multiclass"
    assert data.train_targets.tolist() == [0, 1, 9, 2] and data.val_targets.tolist() == [9, 0]
    for k, image in enumerate([*data.train_images, *data.val_images]):
        assert torch.equal(image, torch.from_numpy(hand_made(k).transpose(2, 0, 1).copy()))
    # root may also be the stl10_binary folder itself.
    same = load(format="stl10", root=str(root / "stl10_binary"), image_size=96)
    assert torch.equal(same.val_images, data.val_images)


def test_stl10_resized_and_grey_match_the_same_image_read_from_a_file(tmp_path: Path) -> None:
    root = write_stl10(tmp_path / "stl", [4, 5], [6])
    png = tmp_path / "image0.png"
    Image.fromarray(hand_made(0)).save(png)
    for channels, size, resize in ((3, 48, None), (1, 32, None), (3, 32, 40)):
        data = load(format="stl10", root=str(root), image_size=size, channels=channels, resize=resize)
        decoded = decode_images([str(png)], resize or size, 1, channels)[0]
        top = ((resize or size) - size + 1) // 2
        expected = decoded[:, top : top + size, top : top + size]
        assert torch.equal(data.train_images[0], torch.from_numpy(np.ascontiguousarray(expected)))


def test_stl10_unlabeled_images_join_the_pretext_training_split(tmp_path: Path) -> None:
    root = write_stl10(tmp_path / "stl", [1, 2], [3], unlabeled=3)
    data = load(format="stl10", root=str(root), image_size=96, pretext="rotation", unlabeled=True)
    assert len(data.train_targets) == 4 * (2 + 3) and len(data.val_targets) == 4
    for position, k in enumerate([0, 1, 3, 4, 5]):  # train images 0, 1; the test image is 2
        upright = torch.from_numpy(hand_made(k).transpose(2, 0, 1).copy())
        for turn in range(4):
            assert torch.equal(
                data.train_images[4 * position + turn], torch.rot90(upright, turn, dims=(1, 2))
            )
    assert data.train_targets.tolist() == [0, 1, 2, 3] * 5
    # Not asked for: the (here malformed) file is never opened.
    plain = write_stl10(tmp_path / "plain", [1, 2], [3])
    assert len(load(format="stl10", root=str(plain), image_size=96, pretext="rotation").train_targets) == 8
    with pytest.raises(SpecError, match=r"unlabeled_X.bin has 1 bytes, not a multiple of 3x96x96"):
        load(format="stl10", root=str(plain), pretext="rotation", unlabeled=True)


def test_stl10_errors_name_the_file(tmp_path: Path) -> None:
    root = write_stl10(tmp_path / "a", [1, 2], [3])
    np.asarray([1, 11], dtype=np.uint8).tofile(root / "stl10_binary" / "train_y.bin")
    with pytest.raises(SpecError, match=r"train_y.bin byte 1 is label 11, not 1..10"):
        load(format="stl10", root=str(root))
    np.asarray([1, 2, 3], dtype=np.uint8).tofile(root / "stl10_binary" / "train_y.bin")
    with pytest.raises(SpecError, match=r"train_X.bin holds 2 images but .*train_y.bin has 3 labels"):
        load(format="stl10", root=str(root))
    with pytest.raises(SpecError, match=r"class_names.txt does not exist; expected stl10 layout"):
        load(format="stl10", root=str(tmp_path))


# --- VOC: difficult objects ----------------------------------------------------------------------


def write_voc(root: Path, images: dict[str, list[tuple[str, int]]]) -> Path:
    """VOC annotations (objects as (name, difficult)), dummy JPEGs and a train list."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objects in images.items():
        body = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
            f"<xmax>5</xmax><ymax>5</ymax></bndbox></object>"
            for n, d in objects
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
        Image.new("RGB", (8, 8)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(images) + "\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(images) + "\n")
    return root


def test_voc_difficult_rules(tmp_path: Path) -> None:
    root = write_voc(
        tmp_path / "voc",
        {
            "a": [("cat", 1), ("dog", 0)],  # cat only difficult
            "b": [("cat", 0), ("cat", 1)],  # cat also shown plainly: a positive under every rule
            "c": [("person", 1)],  # nothing but a difficult person
        },
    )
    cat, dog, person = (VOC_CLASSES.index(n) for n in ("cat", "dog", "person"))

    def table(data: ImageData) -> list[list[int]]:
        return data.val_targets[:, [cat, dog, person]].int().tolist()

    ignore = load(format="voc", root=str(root), image_size=8)  # the default
    assert table(ignore) == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert ignore.val_ignore is not None and ignore.val_ignore.dtype == torch.bool
    assert ignore.val_ignore[:, [cat, dog, person]].tolist() == [
        [True, False, False],
        [False] * 3,
        [False, False, True],
    ]
    assert int(ignore.val_ignore.sum()) == 2  # nowhere else
    negative = load(format="voc", root=str(root), image_size=8, voc_difficult="negative")
    assert table(negative) == [[0, 1, 0], [1, 0, 0], [0, 0, 0]] and negative.val_ignore is None
    positive = load(format="voc", root=str(root), image_size=8, voc_difficult="positive")
    assert table(positive) == [[1, 1, 0], [1, 0, 0], [0, 0, 1]] and positive.val_ignore is None


def test_ignored_labels_leave_ap_as_if_their_images_were_absent() -> None:
    """train.py's mAP with VOC's flags (see docs/datasets.md): an ignored (image, class) pair leaves
    that class's AP as if the image were not there (positives flagged included); with flagged
    negatives only, the same as scoring them -inf."""
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.normal(size=(40, 3)))
    targets = torch.from_numpy((rng.random((40, 3)) < 0.4).astype(np.float32))
    ignore = torch.from_numpy(rng.random((40, 3)) < 0.25)
    masked = average_precision(scores, targets, ignore)
    for k in range(3):
        keep = ~ignore[:, k]
        alone = average_precision(scores[keep, k], targets[keep, k])
        assert torch.allclose(masked[k], alone[0])
    negatives = ignore & (targets == 0)
    at_the_end = average_precision(scores.masked_fill(negatives, float("-inf")), targets)
    assert torch.allclose(average_precision(scores, targets, negatives), at_the_end)


# --- report 002's pretext tasks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("scenes"), classes=3, per_class=4, size=(20, 16))


def test_rotation_shows_every_image_at_four_angles(scenes: Path) -> None:
    plain = load(format="imagefolder", root=str(scenes), image_size=12)
    rotated = load(format="imagefolder", root=str(scenes), image_size=12, pretext="rotation")
    assert rotated.classes == ROTATION_CLASSES and rotated.num_classes == 4
    n = len(plain.train_images)
    assert rotated.train_images.shape == (4 * n, 3, 12, 12) and rotated.train_images.is_contiguous()
    assert rotated.train_targets.tolist() == [0, 1, 2, 3] * n
    assert len(rotated.val_targets) == 4 * len(plain.val_targets)
    for i in range(n):
        for k in range(4):
            expected = torch.rot90(plain.train_images[i], k, dims=(1, 2))
            assert torch.equal(rotated.train_images[4 * i + k], expected)
    # Counter-clockwise, by hand: the top-right pixel goes to the top-left at 90 degrees.
    marked = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    marked[0, 0, 0, 2] = 9
    assert torch.rot90(marked, 1, dims=(2, 3))[0, 0, 0, 0] == 9


def test_perturbation_pastes_one_black_or_white_square_labelled_by_its_colour(scenes: Path) -> None:
    plain = load(format="imagefolder", root=str(scenes), image_size=12)
    data = load(
        format="imagefolder", root=str(scenes), image_size=12, pretext="perturbation", perturbation_size=0.25
    )
    assert data.classes == PERTURBATION_CLASSES and data.num_classes == 2
    side = square_side(12, 0.25)
    assert side == 3
    for before, after, label in zip(plain.train_images, data.train_images, data.train_targets, strict=True):
        value = 255 if int(label) == 1 else 0
        # Exactly one side x side square of `value` in every channel was pasted, nothing else changed:
        # some window, painted over `before`, gives `after`.
        fits = []
        for top in range(12 - side + 1):
            for left in range(12 - side + 1):
                expected = before.clone()
                expected[:, top : top + side, left : left + side] = value
                fits.append(torch.equal(after, expected))
        assert any(fits)
        assert not torch.equal(after, before) or (before == value).all(dim=0).any()
    assert set(data.train_targets.tolist()) == {0, 1}
    again = load(
        format="imagefolder", root=str(scenes), image_size=12, pretext="perturbation", perturbation_size=0.25
    )
    assert torch.equal(again.train_images, data.train_images)
    assert torch.equal(again.train_targets, data.train_targets)


def test_perturbation_draws_depend_on_the_seed(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "s", splits={"train": 8, "val": 2}, classes=2, size=(10, 10))
    options: dict[str, Any] = {
        "format": "imagefolder",
        "root": str(root),
        "image_size": 8,
        "pretext": "perturbation",
    }
    first, other = load(seed=0, **options), load(seed=1, **options)
    assert not torch.equal(first.train_images, other.train_images)
    assert 4 <= int(first.train_targets.sum()) <= 12  # about half of 16 white (binomial, seed 0: fixed)


def test_perturbation_is_fixed_per_image_whatever_the_subset(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "s", splits={"train": 6, "val": 2}, classes=2, size=(10, 10))
    full = load(format="imagefolder", root=str(root), image_size=8, pretext="perturbation")
    half = load(format="imagefolder", root=str(root), image_size=8, pretext="perturbation", subset=0.5)
    rows = {
        bytes(image.numpy()): int(t) for image, t in zip(full.train_images, full.train_targets, strict=True)
    }
    for image, target in zip(half.train_images, half.train_targets, strict=True):
        assert rows[bytes(image.numpy())] == int(target)  # the very same pasted image and label


# --- through the CLI -----------------------------------------------------------------------------


def study(directory: Path, name: str, data: dict[str, Any]) -> Path:
    body = {
        "name": name,
        "objective": "image_classifier",
        "data": data,
        "settings": {"model": "mlp", "mlp_width": 16, "mlp_layers": 1, "batch_size": 4, "optimizer": "adam"},
        "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 1,
        "budget": {"max_epochs": 1},
        "sampler": "random",
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.slow
def test_stl10_and_pretext_trials_through_hpo_worker(tmp_path: Path, scenes: Path) -> None:
    stl = write_stl10(tmp_path / "stl", [1, 2, 3, 1, 2, 3], [1, 2, 3])
    studies = {
        "tiny_stl10": {"format": "stl10", "root": str(stl), "image_size": 16, "channels": 1},
        "tiny_rotation": {
            "format": "imagefolder",
            "root": str(scenes),
            "image_size": 8,
            "pretext": "rotation",
        },
    }
    # Both workers at once: most of their time is start-up (imports), which overlaps.
    workers = [
        start_cli(
            ["worker", str(study(tmp_path, name, data)), "--storage", f"sqlite:///{tmp_path / name}.db"]
        )
        for name, data in studies.items()
    ]
    for name, worker in zip(studies, workers, strict=True):
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, out
        assert "trial 0 COMPLETE" in out, out
        trial = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db").trials[0]
        assert trial.state == optuna.trial.TrialState.COMPLETE
