"""Image datasets (objectives.vision.data): every layout, stratified subsets, cache, bad data.

All datasets are small synthetic trees written by ``tests/support/synthetic_data.py``; their images
encode their labels, so the tests check that each decoded image carries its own target.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image
from synthetic_data import (
    class_color,
    make_celeba,
    make_imagefolder,
    make_tiny_imagenet,
    make_voc,
    nearest_class,
    read_label_grid,
)

from hpo.errors import SpecError
from objectives.vision import CELEBA_ATTRIBUTES, VOC_CLASSES, DataConfig, ImageData, _split, load_image_data


def load(seed: int = 0, **options: Any) -> ImageData:
    return load_image_data(DataConfig(**options), seed=seed)


def assert_images(images: torch.Tensor, n: int, size: int) -> None:
    assert images.dtype == torch.uint8
    assert tuple(images.shape) == (n, 3, size, size)
    assert images.is_contiguous()


def assert_colours_match(data: ImageData) -> None:
    for images, targets in ((data.train_images, data.train_targets), (data.val_images, data.val_targets)):
        read = [nearest_class(image, len(data.classes)) for image in images]
        assert read == targets.tolist()


def assert_grids_match(data: ImageData) -> None:
    """The label grids drawn in the images are the targets (the ignored labels included: the
    synthetic VOC images show every object, difficult ones too)."""
    splits = (
        (data.train_images, data.train_targets, data.train_ignore),
        (data.val_images, data.val_targets, data.val_ignore),
    )
    for images, targets, ignore in splits:
        read = np.stack([read_label_grid(image, len(data.classes)) for image in images])
        shown = targets.numpy() if ignore is None else np.maximum(targets.numpy(), ignore.numpy())
        np.testing.assert_array_equal(read, shown)
        if ignore is not None:
            assert not targets.numpy()[ignore.numpy()].any()  # an ignored label is never a positive


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "imagefolder", "root": "x", "attributes": ["Smiling"]}, "applies only to format celeba"),
        ({"format": "voc", "target_attribute": "Smiling"}, "applies only to format celeba"),
        ({"format": "celeba", "train_split": "a"}, "applies only to formats imagefolder and voc"),
        ({"format": "celeba", "attributes": ["Male"], "target_attribute": "Smiling"}, "not both"),
        ({"format": "celeba", "attributes": ["Male", "Male"]}, "must not repeat"),
        ({"format": "digits", "root": "/data"}, "root does not apply"),
        ({"format": "digits", "subset": 0}, "greater than 0"),
        ({"format": "digits", "val_fraction": 1.0}, "less than 1"),
        ({"format": "mnist"}, "Input should be"),
        ({"format": "digits", "roott": "/x"}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        DataConfig(**options)


def test_config_is_frozen() -> None:
    config = DataConfig(format="digits")
    with pytest.raises(pydantic.ValidationError):
        config.image_size = 32


# --- layouts ---------------------------------------------------------------------------------


def test_imagefolder_single_tree_splits_off_stratified_validation(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "scene", classes=["kitchen", "forest", "coast"], per_class=10)
    data = load(format="imagefolder", root=str(root), image_size=16, val_fraction=0.3)
    assert data.classes == ("coast", "forest", "kitchen")  # sorted, like torchvision's ImageFolder
    assert data.task == "multiclass" and data.num_classes == 3
    assert_images(data.train_images, 21, 16)
    assert_images(data.val_images, 9, 16)
    assert data.train_targets.dtype == torch.int64
    assert Counter(data.val_targets.tolist()) == {0: 3, 1: 3, 2: 3}
    assert_colours_match(data)


@pytest.mark.parametrize("val_name", ["val", "test"])
def test_imagefolder_with_its_own_validation_folder(tmp_path: Path, val_name: str) -> None:
    root = make_imagefolder(tmp_path / "stl", classes=4, splits={"train": 5, val_name: [1, 2, 3, 1]})
    data = load(format="imagefolder", root=str(root), image_size=12, val_fraction=0.5)
    assert len(data.train_targets) == 20  # val_fraction is ignored: the dataset has a val split
    assert Counter(data.val_targets.tolist()) == {0: 1, 1: 2, 2: 3, 3: 1}
    assert_colours_match(data)


def test_imagefolder_named_splits(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "t", classes=2, splits={"fit": 3, "holdout": 2, "val": 1})
    data = load(format="imagefolder", root=str(root), train_split="fit", val_split="holdout", image_size=8)
    assert (len(data.train_targets), len(data.val_targets)) == (6, 4)


def test_images_are_resized_by_shorter_side_and_center_cropped(tmp_path: Path) -> None:
    """A wide and a tall image with red borders around a green square: the crop keeps the green."""
    root = tmp_path / "crop"
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :, 0] = 255
    wide[:, 40:80] = (0, 255, 0)
    for name, array in (("wide.png", wide), ("tall.jpg", wide.transpose(1, 0, 2).copy())):
        (root / "shapes").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / "shapes" / name, quality=95)
    # Other modes a folder may hold: greyscale and palette with transparency become RGB.
    Image.new("L", (30, 20), 200).save(root / "shapes" / "grey.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).convert("P").save(root / "shapes" / "pal.png")
    (root / "other").mkdir()
    for i in range(3):
        Image.new("RGB", (9, 9)).save(root / "other" / f"y{i}.bmp")
    (root / "shapes" / "notes.txt").write_text("not an image")
    data = load(format="imagefolder", root=str(root), image_size=20, val_fraction=0.3, seed=3)
    images = torch.cat([data.train_images, data.val_images])
    targets = torch.cat([data.train_targets, data.val_targets])
    shapes = images[targets == 1]  # classes: ("other", "shapes")
    assert len(shapes) == 4 and data.classes == ("other", "shapes")
    green = [img for img in shapes if img[1].float().mean() > 200]
    assert len(green) == 2
    for image in green:  # whole crop green: the red borders were cut away, not squeezed in
        assert image[0].float().mean() < 10


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200", classes=4, train_per_class=6, val_per_class=3)
    data = load(format="tiny_imagenet", root=str(root), image_size=16)
    wnids = (root / "wnids.txt").read_text().split()
    assert data.classes == tuple(sorted(wnids))
    assert_images(data.train_images, 24, 16)
    assert_images(data.val_images, 12, 16)
    assert Counter(data.val_targets.tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert_colours_match(data)


def test_celeba_multilabel_uses_the_partition_file(tmp_path: Path) -> None:
    root = make_celeba(tmp_path / "celeba", n=20, partition=(0.5, 0.25, 0.25))
    data = load(format="celeba", root=str(root), image_size=21)
    assert data.task == "multilabel" and data.classes == CELEBA_ATTRIBUTES
    assert_images(data.train_images, 10, 21)
    assert_images(data.val_images, 5, 21)  # partition 2 (test) stays out of the search
    assert data.train_targets.dtype == torch.float32 and data.train_targets.shape == (10, 40)
    assert set(data.train_targets.unique().tolist()) == {0.0, 1.0}
    assert_grids_match(data)


def test_celeba_chosen_attributes_and_single_target(tmp_path: Path) -> None:
    root = make_celeba(tmp_path / "celeba", n=20, partition=None, seed=4)
    full = load(format="celeba", root=str(root), image_size=21, val_fraction=0.25)
    assert len(full.train_targets) + len(full.val_targets) == 20  # no partition file: split off
    chosen = load(
        format="celeba", root=str(root), image_size=21, val_fraction=0.25, attributes=["Young", "Bald"]
    )
    assert chosen.classes == ("Young", "Bald")
    columns = [CELEBA_ATTRIBUTES.index("Young"), CELEBA_ATTRIBUTES.index("Bald")]
    for images, targets in (
        (chosen.train_images, chosen.train_targets),
        (chosen.val_images, chosen.val_targets),
    ):
        read = np.stack([read_label_grid(image, 40)[columns] for image in images])
        np.testing.assert_array_equal(read, targets.numpy())
    single = load(
        format="celeba", root=str(root), image_size=21, val_fraction=0.25, target_attribute="Smiling"
    )
    assert single.task == "multiclass" and single.classes == ("not_Smiling", "Smiling")
    assert single.train_targets.dtype == torch.int64
    smiling = CELEBA_ATTRIBUTES.index("Smiling")
    for images, targets in (
        (single.train_images, single.train_targets),
        (single.val_images, single.val_targets),
    ):
        smiles = [int(read_label_grid(image, 40)[smiling]) for image in images]
        assert smiles == targets.tolist()


def test_voc_multilabel(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", train=14, val=7)
    data = load(format="voc", root=str(root), image_size=20)
    assert data.task == "multilabel" and data.classes == VOC_CLASSES
    assert_images(data.train_images, 14, 20)
    assert_images(data.val_images, 7, 20)
    assert data.train_targets.shape == (14, 20)
    assert_grids_match(data)


def test_voc_without_val_list_splits_train(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "VOC2012", train=20, val=None)
    data = load(format="voc", root=str(root), image_size=20, val_fraction=0.25)
    assert len(data.train_targets) + len(data.val_targets) == 20
    assert 3 <= len(data.val_targets) <= 8
    assert_grids_match(data)


def test_digits_are_upscaled_to_three_grey_channels() -> None:
    data = load(format="digits", image_size=16)
    assert data.classes == tuple("0123456789")
    assert len(data.train_targets) + len(data.val_targets) == 1797
    assert_images(data.train_images, len(data.train_targets), 16)
    assert torch.equal(data.train_images[:, 0], data.train_images[:, 2])
    assert data.train_images.max() > 200 and data.train_images.min() == 0
    assert set(data.val_targets.tolist()) == set(range(10))


# --- stratified subsets ----------------------------------------------------------------------


def test_subset_keeps_every_class_of_an_imbalanced_101_class_tree(tmp_path: Path) -> None:
    counts = [2, 3, 4, *np.random.default_rng(7).integers(5, 25, size=98).tolist()]
    root = make_imagefolder(tmp_path / "caltech101", classes=101, per_class=counts, size=(12, 10))
    data = load(format="imagefolder", root=str(root), image_size=8, subset=0.1, val_fraction=0.2)
    assert len(data.classes) == 101
    assert set(data.train_targets.tolist()) == set(range(101))
    assert set(data.val_targets.tolist()) == set(range(101))
    total = sum(counts)
    # About 10% of each split; the one-per-class floor may add at most one image per class.
    assert 0.8 * 0.1 * total <= len(data.train_targets) <= 0.8 * 0.1 * total + 101
    full = load(format="imagefolder", root=str(root), image_size=8, val_fraction=0.2)
    assert len(data.train_targets) < len(full.train_targets) / 2


def test_subset_is_deterministic_by_seed(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", classes=5, per_class=12, size=(10, 10))
    options = {"format": "imagefolder", "root": str(root), "image_size": 8, "subset": 0.5}
    first, again, other = load(seed=1, **options), load(seed=1, **options), load(seed=2, **options)
    assert torch.equal(first.train_images, again.train_images)
    assert torch.equal(first.val_images, again.val_images)
    assert torch.equal(first.train_targets, again.train_targets)
    assert not torch.equal(first.train_images, other.train_images)
    # Same allocation rule: per-class counts are the same multiset; remainders go to random classes.
    assert sorted(Counter(first.train_targets.tolist()).values()) == sorted(
        Counter(other.train_targets.tolist()).values()
    )


def test_multilabel_subset_keeps_rare_labels(tmp_path: Path) -> None:
    common = [["person"], ["person", "dog"], ["car"], ["car", "person"]] * 10
    rare = [["cow", "person"], ["sheep", "car"], ["boat", "person", "car"]]
    everything = [[name] for name in VOC_CLASSES]
    root = make_voc(tmp_path / "voc", train=common + rare, val=common + everything, seed=2)
    data = load(format="voc", root=str(root), image_size=20, subset=0.1, voc_difficult="positive")
    assert len(data.train_targets) <= 8  # 10% of 43, plus at most one per label
    present = {VOC_CLASSES[k] for k in np.flatnonzero(data.train_targets.sum(0).numpy())}
    assert present == {"person", "dog", "car", "cow", "sheep", "boat"}
    assert (data.val_targets.sum(0) > 0).all()
    assert_grids_match(data)


def test_split_helpers_properties() -> None:
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(30), rng.integers(1, 40, size=30))
    train, val = _split.split(targets, 0.25, np.random.default_rng(5))
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).size == len(targets)
    counts = np.bincount(targets)
    assert set(targets[train]) == set(range(30))
    assert set(targets[val]) == {c for c in range(30) if counts[c] >= 2}  # a singleton stays in train
    assert abs(len(val) - 0.25 * len(targets)) <= 30
    again = _split.split(targets, 0.25, np.random.default_rng(5))
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    picked = _split.sample(targets, 0.05, np.random.default_rng(1))
    assert set(targets[picked]) == set(range(30)) and np.all(np.diff(picked) > 0)

    labels = (rng.random((500, 12)) < np.linspace(0.002, 0.5, 12)).astype(np.uint8)
    labels[0, 0] = labels[1, 0] = 1  # the rarest label has at least two positives
    train, val = _split.split(labels, 0.2, np.random.default_rng(3))
    positives = labels.sum(0) > 0
    assert np.array_equal(labels[train].sum(0) > 0, positives)
    assert np.array_equal(labels[val].sum(0) > 0, labels.sum(0) >= 2)
    picked = _split.sample(labels[train], 0.02, np.random.default_rng(4))
    assert np.array_equal(labels[train][picked].sum(0) > 0, positives)


def test_multilabel_sample_adds_a_label_no_stratum_carries() -> None:
    """Label 2 is never a sample's rarest label (0 and 1 win the ties), so only repair keeps it."""
    labels = np.zeros((20, 3), dtype=np.uint8)
    labels[:10, 0] = labels[10:, 1] = 1
    labels[[0, 1, 2, 3, 4, 10, 11, 12, 13, 14], 2] = 1
    sizes = set()
    for seed in range(20):
        picked = _split.sample(labels, 0.1, np.random.default_rng(seed))
        assert (labels[picked].sum(0) > 0).all()
        sizes.add(len(picked))
    assert sizes == {2, 3}  # one per stratum, plus the added sample when label 2 was missed


# --- fast path: cache and threads ------------------------------------------------------------


def test_cache_returns_the_same_tensors_without_reading_the_disk(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", classes=3, per_class=6)
    config = DataConfig(format="imagefolder", root=str(root), image_size=8)
    cache: dict[str, Any] = {}
    first = load_image_data(config, seed=0, cache=cache)
    shutil.rmtree(root)
    second = load_image_data(config, seed=0, cache=cache)
    assert second is first and second.train_images is first.train_images
    with pytest.raises(SpecError, match="does not exist"):  # another seed is another selection
        load_image_data(config, seed=1, cache=cache)


def test_decoding_threads_do_not_change_the_result(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", classes=4, per_class=25, size=(30, 20))
    config = DataConfig(format="imagefolder", root=str(root), image_size=16)
    one = load_image_data(config, seed=0, workers=1)
    four = load_image_data(config, seed=0, workers=4)
    assert torch.equal(one.train_images, four.train_images) and torch.equal(one.val_images, four.val_images)


def test_image_data_moves_between_devices(tmp_path: Path) -> None:
    data = load(format="digits", image_size=8, subset=0.1)
    moved = data.to("meta")
    assert moved.device.type == "meta" and moved.val_targets.device.type == "meta"
    assert moved.classes == data.classes and data.device.type == "cpu"


# --- where the data is -----------------------------------------------------------------------


def test_root_defaults_to_a_folder_under_hpo_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tiny_imagenet(tmp_path / "tiny-imagenet-200", classes=2, train_per_class=2, val_per_class=1)
    make_imagefolder(tmp_path / "scenes", classes=2, per_class=3)
    monkeypatch.setenv("HPO_DATA_ROOT", str(tmp_path))
    assert load(format="tiny_imagenet", image_size=8).classes[0].startswith("n")
    assert len(load(format="imagefolder", root="scenes", image_size=8).classes) == 2
    monkeypatch.delenv("HPO_DATA_ROOT")
    with pytest.raises(SpecError, match=r"data\.root: is not set and neither is \$HPO_DATA_ROOT"):
        load(format="tiny_imagenet")
    with pytest.raises(SpecError, match=r"data\.root: is required for format imagefolder"):
        load(format="imagefolder")


# --- missing and malformed data --------------------------------------------------------------


def test_a_tree_that_leaves_nothing_to_validate_on_or_to_tell_apart_is_refused(tmp_path: Path) -> None:
    # Both trained to val_loss 0 in every trial, the best value there is: each trial looked perfect.
    make_imagefolder(tmp_path / "one_each", classes=3, per_class=1)
    with pytest.raises(SpecError, match=r"data\.val_fraction: leaves no validation images"):
        load(format="imagefolder", root=str(tmp_path / "one_each"), image_size=8)
    make_imagefolder(tmp_path / "one_class", classes=1, per_class=6)
    with pytest.raises(SpecError, match=r"data\.root: .*has 1 class \(.*\): nothing to tell apart"):
        load(format="imagefolder", root=str(tmp_path / "one_class"), image_size=8)
    # Two images of one class and one of another: the larger class still validates.
    make_imagefolder(tmp_path / "uneven", classes=2, per_class=[2, 1])
    data = load(format="imagefolder", root=str(tmp_path / "uneven"), image_size=8)
    assert len(data.val_targets) == 1 and len(data.train_targets) == 2


def _rewrite(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


def _missing_root(d: Path) -> Path:
    return d / "nowhere"


def _root_is_file(d: Path) -> Path:
    (d / "f.txt").write_text("x")
    return d / "f.txt"


def _no_class_folders(d: Path) -> Path:
    (d / "e").mkdir()
    return d / "e"


def _empty_class(d: Path) -> Path:
    make_imagefolder(d / "r", 2, 2)
    (d / "r" / "zebra").mkdir()
    return d / "r"


def _val_has_unknown_class(d: Path) -> Path:
    make_imagefolder(d / "r", 2, splits={"train": 2, "val": 1})
    make_imagefolder(d / "r" / "val", ["zebra"], 1)
    return d / "r"


def _val_lacks_class(d: Path) -> Path:
    make_imagefolder(d / "r", 2, splits={"train": 2, "val": 1})
    shutil.rmtree(d / "r" / "val" / "class_1")
    return d / "r"


def _undecodable_image(d: Path) -> Path:
    make_imagefolder(d / "r", 2, 3)
    (d / "r" / "class_0" / "class_0_0001.jpg").write_bytes(b"not a jpeg at all")
    return d / "r"


def _no_wnids(d: Path) -> Path:
    make_tiny_imagenet(d / "t")
    (d / "t" / "wnids.txt").unlink()
    return d / "t"


def _unknown_val_wnid(d: Path) -> Path:
    make_tiny_imagenet(d / "t")
    (d / "t" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t5\t5\n")
    return d / "t"


def _no_attribute_file(d: Path) -> Path:
    make_celeba(d / "c", n=4)
    (d / "c" / "list_attr_celeba.txt").unlink()
    return d / "c"


def _count_mismatch(d: Path) -> Path:
    make_celeba(d / "c", n=4)
    _rewrite(d / "c" / "list_attr_celeba.txt", "4", "5")
    return d / "c"


def _bad_attribute_value(d: Path) -> Path:
    make_celeba(d / "c", n=4)
    _rewrite(d / "c" / "list_attr_celeba.txt", "000002.jpg -1", "000002.jpg  7")
    return d / "c"


def _surplus_attribute_value(d: Path) -> Path:
    make_celeba(d / "c", n=4)
    _rewrite(d / "c" / "list_attr_celeba.txt", "000003.jpg ", "000003.jpg  1 ")
    return d / "c"


def _missing_celeba_image(d: Path) -> Path:
    make_celeba(d / "c", n=4, partition=None)
    (d / "c" / "img_align_celeba" / "000003.jpg").unlink()
    return d / "c"


def _no_train_list(d: Path) -> Path:
    make_voc(d / "v")
    (d / "v" / "ImageSets" / "Main" / "train.txt").unlink()
    return d / "v"


def _missing_annotation(d: Path) -> Path:
    make_voc(d / "v")
    (d / "v" / "Annotations" / "2008_000001.xml").unlink()
    return d / "v"


def _unknown_voc_class(d: Path) -> Path:
    make_voc(d / "v", train=[["cat"]], val=None)
    _rewrite(d / "v" / "Annotations" / "2008_000000.xml", "<name>cat", "<name>unicorn")
    return d / "v"


def _broken_xml(d: Path) -> Path:
    make_voc(d / "v")
    (d / "v" / "Annotations" / "2008_000002.xml").write_text("<annotation>")
    return d / "v"


BAD_CASES: list[tuple[str, Callable[[Path], Path], dict[str, Any], str]] = [
    ("imagefolder", _missing_root, {}, "nowhere does not exist"),
    ("imagefolder", _root_is_file, {}, "f.txt is not a folder"),
    ("imagefolder", _no_class_folders, {}, "e has no class folders"),
    ("imagefolder", _empty_class, {}, "class folder .*zebra has no images"),
    ("imagefolder", _val_has_unknown_class, {}, "val has class folders that .*train lacks: zebra"),
    ("imagefolder", _val_lacks_class, {}, "val has no folder for class 'class_1'"),
    ("imagefolder", _empty_class, {"train_split": "fit"}, "fit does not exist"),
    ("imagefolder", _undecodable_image, {}, "class_0_0001.jpg: cannot decode image"),
    ("tiny_imagenet", _no_wnids, {}, "wnids.txt does not exist"),
    ("tiny_imagenet", _unknown_val_wnid, {}, "val_annotations.txt:1 names class 'n99999999'"),
    (
        "celeba",
        _no_attribute_file,
        {},
        r"neither .*c/list_attr_celeba.txt \(flat layout\) nor .*c/Anno/list_attr_celeba.txt",
    ),
    ("celeba", _count_mismatch, {}, "announces 5 images on line 1 but lists 4"),
    ("celeba", _bad_attribute_value, {}, "list_attr_celeba.txt:4 is not a file name followed by 40 values"),
    (
        "celeba",
        _surplus_attribute_value,
        {},
        "list_attr_celeba.txt:5 is not a file name followed by 40 values",
    ),
    ("celeba", _missing_celeba_image, {}, "000003.jpg is listed by the dataset but does not exist"),
    ("voc", _no_train_list, {}, "train.txt does not exist"),
    ("voc", _missing_annotation, {}, "2008_000001.xml does not exist"),
    ("voc", _unknown_voc_class, {}, "has object 'unicorn', not one of the 20 VOC classes"),
    ("voc", _broken_xml, {}, "2008_000002.xml is not a readable annotation"),
]


@pytest.mark.parametrize(
    ("fmt", "setup", "options", "message"), BAD_CASES, ids=[case[1].__name__.strip("_") for case in BAD_CASES]
)
def test_bad_data_gets_one_line_naming_path_and_layout(
    tmp_path: Path, fmt: str, setup: Callable[[Path], Path], options: dict[str, Any], message: str
) -> None:
    root = setup(tmp_path)
    with pytest.raises(SpecError) as caught:
        config = DataConfig.model_validate({"format": fmt, "root": str(root), "image_size": 8, **options})
        load_image_data(config, 0, source="s.yaml")
    text = str(caught.value)
    assert "\n" not in text and text.startswith("s.yaml: data.")
    assert str(tmp_path) in text  # the path at fault, in full
    assert re.search(message, text), text
    if "cannot decode" not in text:
        assert f"expected {fmt} layout: " in text


def test_unknown_celeba_attribute_names_the_field(tmp_path: Path) -> None:
    root = make_celeba(tmp_path / "c", n=4)
    for options, field in (
        ({"attributes": ["Smiling", "Happy"]}, "attributes"),
        ({"target_attribute": "Tall"}, "target_attribute"),
    ):
        with pytest.raises(SpecError, match=rf"data\.{field}: .*has no attribute") as caught:
            load(format="celeba", root=str(root), **options)
        assert "Wavy_Hair" in str(caught.value)  # the hint lists the attributes there are


def test_class_colours_are_distinct() -> None:
    """The synthetic trees rely on it: 101 classes read back as themselves."""
    for index in range(101):
        image = np.broadcast_to(np.asarray(class_color(index), dtype=np.uint8)[:, None, None], (3, 4, 4))
        assert nearest_class(image, 101) == index
