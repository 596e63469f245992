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
    "line, then 'file 1 -1 ...'), optionally root/list_eval_partition.txt ('file 0|1|2')",
    "voc": "root/JPEGImages/<id>.jpg, root/Annotations/<id>.xml and root/ImageSets/Main/train.txt "
    "(optionally val.txt)",
}
_VAL_DIR_NAMES = ("val", "valid", "validation", "test")
_EXTENSIONS = frozenset(IMG_EXTENSIONS)  # torchvision's ImageFolder extensions


@dataclass(frozen=True)
class Split:
    """One split: image files (or, for in-memory data, source pixels) and their targets."""

    files: tuple[str, ...]
    targets: np.ndarray  # int64 (N,) multiclass, uint8 (N, K) 0/1 multilabel
    pixels: np.ndarray | None = None  # (N, H, W) uint8 images held in memory (digits)

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Catalog:
    classes: tuple[str, ...]
    task: Literal["multiclass", "multilabel"]
    train: Split
    val: Split | None  # None: the dataset has no validation split; one is split off train


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
    readers = {"imagefolder": _imagefolder, "tiny_imagenet": _tiny_imagenet, "celeba": _celeba, "voc": _voc}
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
    classes = _subfolders(train_dir)
    if not classes:
        raise reader.fail(f"{train_dir} has no class folders")
    train = _class_tree(reader, train_dir, classes)
    val = None
    if val_dir is not None:
        extra = sorted(set(_subfolders(val_dir)) - set(classes))
        if extra:
            raise reader.fail(f"{val_dir} has class folders that {train_dir} lacks: {', '.join(extra[:5])}")
        val = _class_tree(reader, val_dir, classes)
    return Catalog(tuple(classes), "multiclass", train, val)


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


# --- CelebA ----------------------------------------------------------------------------------


def _celeba(reader: _Reader) -> Catalog:
    config, root = reader.config, reader.root
    attr_file = root / "list_attr_celeba.txt"
    lines = reader.text_lines(attr_file)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise reader.fail(f"{attr_file}:1 must be the number of images")
    names = lines[1].split()
    expected = int(lines[0])
    numbered = [(number, line) for number, line in enumerate(lines[2:], start=3) if line.strip()]
    if len(numbered) != expected:
        raise reader.fail(f"{attr_file} announces {expected} images on line 1 but lists {len(numbered)}")
    values = _attribute_values([line for _, line in numbered], len(names))
    if isinstance(values, int):
        raise reader.fail(
            f"{attr_file}:{numbered[values][0]} is not a file name followed by {len(names)} values 1/-1"
        )
    image_names = [line.split(maxsplit=1)[0] for _, line in numbered]

    wanted = _chosen_attributes(reader, names)
    columns = [names.index(a) for a in wanted]
    positive = (values[:, columns] > 0).astype(np.uint8)
    if config.target_attribute is not None:
        targets: np.ndarray = positive[:, 0].astype(np.int64)
        classes: tuple[str, ...] = (f"not_{config.target_attribute}", config.target_attribute)
        task: Literal["multiclass", "multilabel"] = "multiclass"
    else:
        targets, classes, task = positive, tuple(wanted), "multilabel"

    image_dir = reader.directory(root / "img_align_celeba")
    prefix = f"{image_dir}{os.sep}"
    files = np.asarray([prefix + name for name in image_names], dtype=object)
    partition_file = root / "list_eval_partition.txt"
    if not partition_file.exists():
        return Catalog(classes, task, Split(tuple(files), targets), None)
    partition: dict[str, str] = {}
    for number, line in enumerate(reader.text_lines(partition_file), start=1):
        if line.strip():
            fields = line.split()
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise reader.fail(f"{partition_file}:{number} is not 'file 0|1|2'")
            partition[fields[0]] = fields[1]
    missing = [name for name in image_names if name not in partition]
    if missing:
        raise reader.fail(f"{partition_file} has no partition for {missing[0]} (and {len(missing) - 1} more)")
    part = np.asarray([partition[name] for name in image_names])
    train, val = part == "0", part == "1"  # "2" is CelebA's test split, kept out of the search
    if not train.any() or not val.any():
        raise reader.fail(f"{partition_file} must put images in both partition 0 (train) and 1 (val)")
    return Catalog(
        classes,
        task,
        Split(tuple(files[train]), targets[train]),
        Split(tuple(files[val]), targets[val]),
    )


def _attribute_values(rows: list[str], n_attributes: int) -> np.ndarray | int:
    """(N, K) int8 values of 'file v1 ... vK' rows, or the position of the first malformed row."""
    # CelebA has 200k rows x 40 values: numpy's C parser reads them at once. Only when that fails
    # are the rows parsed one by one, to name the line at fault.
    try:
        values = np.loadtxt(rows, dtype=np.int8, usecols=range(1, n_attributes + 1), ndmin=2)
        # usecols ignores surplus columns, so the widths are checked here.
        if np.isin(values, (-1, 0, 1)).all() and all(len(r.split()) == n_attributes + 1 for r in rows):
            return values
    except ValueError:
        pass
    parsed = np.empty((len(rows), n_attributes), dtype=np.int8)
    for position, row in enumerate(rows):
        tokens = row.split()
        if len(tokens) != n_attributes + 1 or any(v not in ("1", "-1", "0") for v in tokens[1:]):
            return position
        parsed[position] = [int(v) for v in tokens[1:]]
    return parsed


def _chosen_attributes(reader: _Reader, names: list[str]) -> list[str]:
    config = reader.config
    field = "data.target_attribute" if config.target_attribute is not None else "data.attributes"
    wanted = [config.target_attribute] if config.target_attribute is not None else config.attributes or names
    unknown = [a for a in wanted if a not in names]
    if unknown:
        raise SpecError(
            reader.source,
            field,
            f"{reader.root / 'list_attr_celeba.txt'} has no attribute {unknown[0]!r}",
            f"use attributes from: {' '.join(names)}",
        )
    return list(wanted)


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
    targets = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.uint8)
    for row, image_id in enumerate(ids):
        xml_file = root / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml_file)
        except FileNotFoundError:
            raise reader.fail(f"{xml_file} does not exist (listed in {id_file})") from None
        except (ET.ParseError, OSError) as exc:
            raise reader.fail(f"{xml_file} is not a readable annotation ({exc})") from None
        # Every object counts, "difficult" ones included: the image does show the class.
        for name in tree.getroot().iterfind("object/name"):
            label = (name.text or "").strip()
            if label not in index:
                raise reader.fail(f"{xml_file} has object {label!r}, not one of the 20 VOC classes")
            targets[row, index[label]] = 1
    files = tuple(str(root / "JPEGImages" / f"{image_id}.jpg") for image_id in ids)
    return Split(files, targets)
