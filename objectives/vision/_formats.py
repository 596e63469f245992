"""Readers of the on-disk dataset layouts (private to :mod:`objectives.vision`).

Each reader turns a root folder into a :class:`Catalog`: image file paths and targets per split,
without decoding any image. Anything missing or malformed raises one
:class:`~hpo.errors.SpecError` that names the offending path and the layout that was expected.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from hpo.errors import SpecError
from objectives.vision import _celeba

if TYPE_CHECKING:
    from objectives.vision.data import DataConfig

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
"""The 20 PASCAL VOC classes, in the order of the multilabel target columns."""

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)  # fmt: skip
"""The 40 attribute columns of CelebA's ``list_attr_celeba.txt``, in file order."""

LAYOUTS = {
    "imagefolder": "root/<class>/<image> (validation is split off), or root/train/<class>/<image> with "
    "root/val/<class>/<image> (or test/)",
    "tiny_imagenet": "root/wnids.txt, root/train/<wnid>/images/*.JPEG, root/val/images/*.JPEG and "
    "root/val/val_annotations.txt (file<TAB>wnid<TAB>box)",
    "celeba": "root/img_align_celeba/*.jpg and root/list_attr_celeba.txt (count line, attribute names "
    "line, then 'file 1 -1 ...'), optionally root/list_eval_partition.txt ('file 0|1|2'); or the archive's "
    "own folders: root/Img/img_align_celeba/*.jpg (img_align_celeba.zip unzipped in Img/), "
    "root/Anno/list_attr_celeba.txt and root/Eval/list_eval_partition.txt",
    "voc": "root/JPEGImages/<id>.jpg, root/Annotations/<id>.xml and root/ImageSets/Main/train.txt "
    "(optionally val.txt)",
    "stl10": "root/stl10_binary/ (or root itself) with train_X.bin, train_y.bin, test_X.bin, test_y.bin "
    "and class_names.txt, as stl10_binary.tar.gz unpacks",
    "caltech101": "root/101_ObjectCategories/<class>/<image>, optionally with the homework's split lists "
    "(e.g. root/train.txt and root/test.txt, one '<class>/<image file>' a line)",
}
CALTECH_IMAGES = "101_ObjectCategories"
"""Caltech101's image folder (the archive's own name), below ``data.root``."""
CALTECH_EXCLUDED: tuple[str, ...] = ("BACKGROUND_Google",)
"""Left out of Caltech101 by default: the clutter category is not an object class (report 004
filters it out, as the homework's own reader does; Caltech101 has 101 classes without it)."""
_VAL_DIR_NAMES = ("val", "valid", "validation", "test")
_EXTENSIONS = frozenset(IMG_EXTENSIONS)  # torchvision's ImageFolder extensions


@dataclass(frozen=True)
class Split:
    """One split: image files (or, for in-memory data, source pixels) and their targets."""

    files: tuple[str, ...]
    targets: np.ndarray  # int64 (N,) multiclass, uint8 (N, K) 0/1 multilabel
    pixels: np.ndarray | None = None  # images held in memory: (N, H, W) digits, (N, 3, H, W) STL-10
    ignore: np.ndarray | None = None  # bool (N, K): label k of image n is neither positive nor negative

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Catalog:
    classes: tuple[str, ...]
    task: Literal["multiclass", "multilabel"]
    train: Split
    val: Split | None  # None: the dataset has no validation split; one is split off train
    test: Split | None = None  # a held-out test split (caltech101's test list), never searched on
    unlabeled: Split | None = None  # images without labels (STL-10's unlabeled_X.bin), for pretext tasks


class _Reader:
    """Shared error construction for one dataset root."""

    def __init__(self, config: DataConfig, root: Path, source: str) -> None:
        self.config = config
        self.root = root
        self.source = source

    def fail(self, message: str, hint: str | None = None, field: str = "data.root") -> SpecError:
        layout = LAYOUTS[self.config.format]
        return SpecError(
            self.source, field, f"{message}; expected {self.config.format} layout: {layout}", hint
        )

    def directory(self, path: Path) -> Path:
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise self.fail(f"{path} {what}")
        return path

    def text_lines(self, path: Path) -> list[str]:
        if not path.is_file():
            raise self.fail(f"{path} " + ("is not a file" if path.exists() else "does not exist"))
        try:
            return path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise self.fail(f"cannot read {path} ({exc})") from None


def read_catalog(config: DataConfig, root: Path, source: str) -> Catalog:
    """The files and targets of a dataset on disk (every format but digits)."""
    reader = _Reader(config, root, source)
    reader.directory(root)
    readers = {
        "imagefolder": _imagefolder,
        "tiny_imagenet": _tiny_imagenet,
        "celeba": _celeba.read,
        "voc": _voc,
        "caltech101": _caltech101,
        "stl10": _stl10,
    }
    return readers[config.format](reader)


# --- ImageFolder -----------------------------------------------------------------------------


def _subfolders(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_under(path: Path) -> list[str]:
    """Image files below ``path`` (recursively, like torchvision's ImageFolder), sorted."""
    found = []
    for parent, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(parent, n)
            for n in sorted(names)
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in _EXTENSIONS
        ]
    return found


def _class_tree(reader: _Reader, folder: Path, classes: Sequence[str]) -> Split:
    files: list[str] = []
    targets: list[int] = []
    for index, name in enumerate(classes):
        class_dir = folder / name
        images = _images_under(class_dir) if class_dir.is_dir() else []
        if not images:
            raise reader.fail(
                f"class folder {class_dir} has no images ({', '.join(sorted(_EXTENSIONS))})"
                if class_dir.is_dir()
                else f"{folder} has no folder for class {name!r}"
            )
        files += images
        targets += [index] * len(images)
    return Split(tuple(files), np.asarray(targets, dtype=np.int64))


def _imagefolder(reader: _Reader) -> Catalog:
    config, root = reader.config, reader.root
    train_dir = root / config.train_split
    if train_dir.is_dir():
        if config.val_split is not None:
            val_dir: Path | None = reader.directory(root / config.val_split)
        else:
            val_dir = next((root / n for n in _VAL_DIR_NAMES if (root / n).is_dir()), None)
    elif "train_split" in config.model_fields_set:
        raise reader.fail(f"{train_dir} does not exist", field="data.train_split")
    elif config.val_split is not None:
        raise reader.fail(
            f"{train_dir} does not exist, so data.val_split cannot apply", field="data.val_split"
        )
    else:
        train_dir, val_dir = root, None
    excluded = _excluded(reader, _subfolders(train_dir))
    classes = [c for c in _subfolders(train_dir) if c not in excluded]
    if not classes:
        raise reader.fail(f"{train_dir} has no class folders")
    train = _class_tree(reader, train_dir, classes)
    val = None
    if val_dir is not None:
        extra = sorted(set(_subfolders(val_dir)) - set(classes) - excluded)
        if extra:
            raise reader.fail(f"{val_dir} has class folders that {train_dir} lacks: {', '.join(extra[:5])}")
        val = _class_tree(reader, val_dir, classes)
    return Catalog(tuple(classes), "multiclass", train, val)


def _excluded(reader: _Reader, folders: Sequence[str]) -> set[str]:
    """The class folders to leave out; a name given in the study file must exist."""
    config = reader.config
    given = config.exclude_classes
    if given is None:  # the format's default: only caltech101 leaves a class out
        return set(CALTECH_EXCLUDED) if config.format == "caltech101" else set()
    unknown = [name for name in given if name not in folders]
    if unknown:
        raise SpecError(
            reader.source,
            "data.exclude_classes",
            f"names {unknown[0]!r}, which is not a class folder of the dataset",
            f"use folder names, e.g. {', '.join(list(folders)[:3])}",
        )
    return set(given)


# --- Caltech101 ------------------------------------------------------------------------------


def _caltech101(reader: _Reader) -> Catalog:
    """Caltech101: the whole tree (validation split off), or the homework's split lists.

    With ``train_list`` the classes are those the list names (sorted, like the homework's reader,
    excluded ones dropped), validation is split off the listed training images and ``test_list``
    becomes the held-out test split.
    """
    config, root = reader.config, reader.root
    images = reader.directory(root / CALTECH_IMAGES)
    folders = _subfolders(images)
    excluded = _excluded(reader, folders)
    if config.train_list is None:
        classes = [c for c in folders if c not in excluded]
        if not classes:
            raise reader.fail(f"{images} has no class folders")
        return Catalog(tuple(classes), "multiclass", _class_tree(reader, images, classes), None)
    train_entries = _split_list(reader, root / config.train_list, "data.train_list", excluded, images)
    classes = sorted({name for name, _ in train_entries})
    if not classes:
        raise reader.fail(f"{root / config.train_list} lists no image", field="data.train_list")
    train = _listed(train_entries, classes, images)
    test = None
    if config.test_list is not None:
        test_list = root / config.test_list
        test_entries = _split_list(reader, test_list, "data.test_list", excluded, images)
        unknown = sorted({name for name, _ in test_entries} - set(classes))
        if unknown:
            raise reader.fail(
                f"{test_list} has images of class {unknown[0]!r}, which {config.train_list} does not list",
                field="data.test_list",
            )
        test = _listed(test_entries, classes, images)
    return Catalog(tuple(classes), "multiclass", train, None, test)


def _split_list(
    reader: _Reader, path: Path, field: str, excluded: set[str], images: Path
) -> list[tuple[str, str]]:
    """(class, relative path) per line of a split list; lines of excluded classes are dropped."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise reader.fail(f"{path} {what}", "give the list's path relative to data.root", field=field)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise reader.fail(f"cannot read {path} ({exc})", field=field) from None
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry:
            continue
        parts = entry.split("/")
        if len(parts) < 2 or entry.startswith("/") or ".." in parts or not all(parts):
            raise reader.fail(f"{path}:{number} is not '<class>/<image file>'", field=field)
        if parts[0] in excluded:
            continue
        if not os.path.isfile(images / entry):
            raise reader.fail(
                f"{path}:{number} lists {entry}, but {images / entry} does not exist", field=field
            )
        entries.append((parts[0], entry))
    return entries


def _listed(entries: list[tuple[str, str]], classes: Sequence[str], images: Path) -> Split:
    index = {name: i for i, name in enumerate(classes)}
    files = tuple(str(images / entry) for _, entry in entries)
    return Split(files, np.asarray([index[name] for name, _ in entries], dtype=np.int64))


# --- Tiny ImageNet ---------------------------------------------------------------------------


def _tiny_imagenet(reader: _Reader) -> Catalog:
    root = reader.root
    wnids = [line.strip() for line in reader.text_lines(root / "wnids.txt") if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise reader.fail(f"{root / 'wnids.txt'} must list distinct class ids, one a line")
    classes = tuple(sorted(wnids))  # sorted like ImageFolder, so indices match an exported tree
    index = {wnid: i for i, wnid in enumerate(classes)}
    files: list[str] = []
    targets: list[int] = []
    train_dir = reader.directory(root / "train")
    for wnid in classes:
        images = _images_under(train_dir / wnid / "images") if (train_dir / wnid / "images").is_dir() else []
        if not images:
            raise reader.fail(f"{train_dir / wnid / 'images'} is missing or has no images")
        files += images
        targets += [index[wnid]] * len(images)
    train = Split(tuple(files), np.asarray(targets, dtype=np.int64))

    annotations = root / "val" / "val_annotations.txt"
    images_dir = reader.directory(root / "val" / "images")
    val_files: list[str] = []
    val_targets: list[int] = []
    for number, line in enumerate(reader.text_lines(annotations), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            raise reader.fail(f"{annotations}:{number} is not 'file<TAB>wnid<TAB>...'")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise reader.fail(f"{annotations}:{number} names class {wnid!r}, which wnids.txt does not list")
        val_files.append(str(images_dir / name))
        val_targets.append(index[wnid])
    if not val_files:
        raise reader.fail(f"{annotations} lists no images")
    return Catalog(classes, "multiclass", train, Split(tuple(val_files), np.asarray(val_targets, np.int64)))


# --- PASCAL VOC ------------------------------------------------------------------------------


def _voc(reader: _Reader) -> Catalog:
    config, root = reader.config, reader.root
    main = root / "ImageSets" / "Main"
    train = _voc_split(reader, main / f"{config.train_split}.txt")
    val_name = config.val_split or "val"
    val = None
    if config.val_split is not None or (main / f"{val_name}.txt").exists():
        val = _voc_split(reader, main / f"{val_name}.txt")
    return Catalog(VOC_CLASSES, "multilabel", train, val)


def _voc_split(reader: _Reader, id_file: Path) -> Split:
    root = reader.root
    ids = [line.split()[0] for line in reader.text_lines(id_file) if line.strip()]
    if not ids:
        raise reader.fail(f"{id_file} lists no image ids")
    index = {name: i for i, name in enumerate(VOC_CLASSES)}
    present = np.zeros((len(ids), len(VOC_CLASSES)), dtype=bool)  # a non-difficult instance
    difficult = np.zeros_like(present)  # a difficult instance
    for row, image_id in enumerate(ids):
        xml_file = root / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml_file)
        except FileNotFoundError:
            raise reader.fail(f"{xml_file} does not exist (listed in {id_file})") from None
        except (ET.ParseError, OSError) as exc:
            raise reader.fail(f"{xml_file} is not a readable annotation ({exc})") from None
        for obj in tree.getroot().iterfind("object"):
            label = (obj.findtext("name") or "").strip()
            if label not in index:
                raise reader.fail(f"{xml_file} has object {label!r}, not one of the 20 VOC classes")
            flag = (obj.findtext("difficult") or "0").strip()
            if flag not in ("0", "1"):
                raise reader.fail(
                    f"{xml_file} has object {label!r} marked <difficult>{flag}</difficult>, not 0/1"
                )
            (difficult if flag == "1" else present)[row, index[label]] = True
    files = tuple(str(root / "JPEGImages" / f"{image_id}.jpg") for image_id in ids)
    # An image whose only instances of a class are difficult: what voc_difficult says it is.
    only_difficult = difficult & ~present
    rule = reader.config.voc_difficult
    targets = (present | only_difficult) if rule == "positive" else present
    ignore = only_difficult if rule == "ignore" else None
    return Split(files, targets.astype(np.uint8), ignore=ignore)


# --- STL-10 ----------------------------------------------------------------------------------

STL10_SIDE = 96
"""STL-10's images are 96x96 RGB."""


def _stl10(reader: _Reader) -> Catalog:
    """STL-10's binary files: train (5,000 labelled images) and test (8,000) as validation.

    Each image is 3 x 96 x 96 bytes, every channel stored column by column (Fortran order, as the
    dataset's MATLAB origins have it), so a channel is transposed to rows x columns here. Labels
    are 1..10 on disk and 0..9 here, in class_names.txt's order. ``unlabeled_X.bin`` (100,000
    images without labels) is read only with ``unlabeled: true``. The files are memory-mapped:
    only the images a subset selects are read.
    """
    root = reader.root
    folder = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    names_file = folder / "class_names.txt"
    classes = tuple(line.strip() for line in reader.text_lines(names_file) if line.strip())
    if not classes or len(set(classes)) != len(classes):
        raise reader.fail(f"{names_file} must list distinct class names, one a line")
    train = _stl10_split(reader, folder, "train", len(classes))
    test = _stl10_split(reader, folder, "test", len(classes))
    unlabeled = None
    if reader.config.unlabeled:
        x_file = folder / "unlabeled_X.bin"
        if not x_file.is_file():
            raise reader.fail(f"{x_file} " + ("is not a file" if x_file.exists() else "does not exist"))
        pixels = _stl10_pixels(reader, x_file)
        unlabeled = Split((), np.zeros(len(pixels), dtype=np.int64), pixels=pixels)
    return Catalog(classes, "multiclass", train, test, unlabeled=unlabeled)


def _stl10_pixels(reader: _Reader, x_file: Path) -> np.ndarray:
    """(N, 3, 96, 96) view of a memory-mapped ``*_X.bin``: the bytes are read when images are selected."""
    per_image = 3 * STL10_SIDE * STL10_SIDE
    size = x_file.stat().st_size
    if size == 0 or size % per_image:
        raise reader.fail(f"{x_file} has {size} bytes, not a multiple of 3x96x96 = {per_image} (one image)")
    raw = np.memmap(x_file, dtype=np.uint8, mode="r", shape=(size // per_image, 3, STL10_SIDE, STL10_SIDE))
    return raw.transpose(0, 1, 3, 2)  # (N, C, W, H) on disk -> (N, C, H, W)


def _stl10_split(reader: _Reader, folder: Path, name: str, n_classes: int) -> Split:
    x_file, y_file = folder / f"{name}_X.bin", folder / f"{name}_y.bin"
    for path in (x_file, y_file):
        if not path.is_file():
            raise reader.fail(f"{path} " + ("is not a file" if path.exists() else "does not exist"))
    pixels = _stl10_pixels(reader, x_file)
    labels = np.fromfile(y_file, dtype=np.uint8)
    if len(pixels) != len(labels):
        raise reader.fail(f"{x_file} holds {len(pixels)} images but {y_file} has {len(labels)} labels")
    bad = np.flatnonzero((labels < 1) | (labels > n_classes))
    if len(bad):
        raise reader.fail(
            f"{y_file} byte {bad[0]} is label {labels[bad[0]]}, not 1..{n_classes} (class_names.txt's lines)"
        )
    return Split((), (labels.astype(np.int64) - 1), pixels=pixels)
