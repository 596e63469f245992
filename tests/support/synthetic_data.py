"""Small synthetic datasets in every layout that ``objectives.vision.data`` reads, for tests.

Each ``make_*`` function writes a tree under ``root`` (created if needed) and returns ``root``.
The images carry their labels, so a test can check that each decoded image got its own target and
a small model can learn them:

* multiclass images are filled with their class's colour (:func:`class_color`) plus a little
  noise; :func:`nearest_class` reads the class back from a decoded ``(3, H, W)`` image;
* multilabel images (CelebA, VOC) are square grids of cells, one per label, bright where the
  label is present; :func:`read_label_grid` reads the labels back. Grids survive any resize
  because those images are square.

Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from objectives.vision import CELEBA_ATTRIBUTES, VOC_CLASSES

Size = int | tuple[int, int]  # a square side, or (width, height)

__all__ = [
    "class_color",
    "label_grid",
    "make_caltech101",
    "make_celeba",
    "make_imagefolder",
    "make_tiny_imagenet",
    "make_voc",
    "nearest_class",
    "read_label_grid",
]


def class_color(index: int) -> tuple[int, int, int]:
    """The RGB colour of class ``index`` (hues spread by the golden ratio, so neighbours differ)."""
    hue = (index * 0.6180339887498949) % 1.0
    value = 0.95 if index % 2 == 0 else 0.6
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return round(r * 255), round(g * 255), round(b * 255)


def nearest_class(image: np.ndarray | object, n_classes: int) -> int:
    """The class whose colour is nearest to the mean colour of a ``(3, H, W)`` image."""
    mean = np.asarray(image, dtype=np.float64).reshape(3, -1).mean(axis=1)
    colors = np.asarray([class_color(i) for i in range(n_classes)], dtype=np.float64)
    return int(np.argmin(((colors - mean) ** 2).sum(axis=1)))


def _grid_side(n_labels: int) -> int:
    return max(1, math.ceil(math.sqrt(n_labels)))


def label_grid(labels: Sequence[bool | int], side: int, rng: np.random.Generator) -> Image.Image:
    """A ``side x side`` RGB image: cell ``k`` of a square grid is bright when ``labels[k]``."""
    grid = _grid_side(len(labels))
    pixels = rng.integers(10, 40, size=(side, side, 3)).astype(np.uint8)
    edges = [round(i * side / grid) for i in range(grid + 1)]
    for k, present in enumerate(labels):
        if present:
            row, col = divmod(k, grid)
            y0, y1, x0, x1 = edges[row], edges[row + 1], edges[col], edges[col + 1]
            pixels[y0:y1, x0:x1] = rng.integers(215, 245, size=(y1 - y0, x1 - x0, 3))
    return Image.fromarray(pixels)


def read_label_grid(image: np.ndarray | object, n_labels: int) -> np.ndarray:
    """0/1 labels read back from a decoded ``(3, H, W)`` grid image (centre of each cell)."""
    pixels = np.asarray(image, dtype=np.float64).mean(axis=0)
    side, grid = pixels.shape[0], _grid_side(n_labels)
    labels = np.zeros(n_labels, dtype=np.uint8)
    for k in range(n_labels):
        row, col = divmod(k, grid)
        y = int((row + 0.5) * side / grid)
        x = int((col + 0.5) * pixels.shape[1] / grid)
        labels[k] = pixels[y, x] > 128
    return labels


def _wh(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def _solid(index: int, size: Size, rng: np.random.Generator) -> Image.Image:
    width, height = _wh(size)
    noise = rng.integers(-12, 13, size=(height, width, 3))
    pixels = np.clip(np.asarray(class_color(index)) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def _class_names(classes: int | Sequence[str]) -> list[str]:
    if isinstance(classes, int):
        width = len(str(classes - 1))
        return [f"class_{i:0{width}d}" for i in range(classes)]
    return list(classes)


def _per_class(counts: int | Sequence[int], n: int) -> list[int]:
    if isinstance(counts, int):
        return [counts] * n
    if len(counts) != n:
        raise ValueError(f"{len(counts)} counts for {n} classes")
    return list(counts)


def make_imagefolder(
    root: Path,
    classes: int | Sequence[str] = 3,
    per_class: int | Sequence[int] = 5,
    size: Size = (32, 24),
    splits: Mapping[str, int | Sequence[int]] | None = None,
    ext: str = "jpg",
    seed: int = 0,
) -> Path:
    """An ImageFolder tree: ``root/<class>/<class>_<j>.<ext>``, ``per_class`` images per class.

    With ``splits`` (e.g. ``{"train": 6, "val": 2}``) it writes ``root/<split>/<class>/...`` with
    that many images per class (an int, or one count per class) instead. Class ``i`` of the
    sorted class names has colour ``class_color(i)``; names default to ``class_00``, ...
    """
    names = _class_names(classes)
    order = {name: i for i, name in enumerate(sorted(names))}
    rng = np.random.default_rng(seed)
    layout = {"": per_class} if splits is None else dict(splits)
    for split, counts in layout.items():
        for name, count in zip(names, _per_class(counts, len(names)), strict=True):
            for j in range(count):
                _save(_solid(order[name], size, rng), root / split / name / f"{name}_{j:04d}.{ext}")
    return root


def make_tiny_imagenet(
    root: Path,
    classes: int = 3,
    train_per_class: int = 5,
    val_per_class: int = 2,
    size: Size = 64,
    seed: int = 0,
) -> Path:
    """Tiny ImageNet's layout: wnids.txt (unsorted), train/<wnid>/images/, val/ with annotations.

    Class ``i`` is the ``i``-th wnid in sorted order, with colour ``class_color(i)``.
    """
    rng = np.random.default_rng(seed)
    wnids = [f"n{1_440_764 + 7919 * i:08d}" for i in range(classes)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in reversed(wnids)))
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    for i, wnid in enumerate(sorted(wnids)):
        boxes = []
        for j in range(train_per_class):
            name = f"{wnid}_{j}.JPEG"
            _save(_solid(i, size, rng), root / "train" / wnid / "images" / name)
            boxes.append(f"{name}\t0\t0\t10\t10\n")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    annotations = []
    for k in range(classes * val_per_class):
        i = k % classes
        name = f"val_{k}.JPEG"
        _save(_solid(i, size, rng), root / "val" / "images" / name)
        annotations.append(f"{name}\t{sorted(wnids)[i]}\t1\t2\t30\t40\n")
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    _save(_solid(0, size, rng), root / "test" / "images" / "test_0.JPEG")
    return root


def make_celeba(
    root: Path,
    n: int = 30,
    attributes: Sequence[str] = CELEBA_ATTRIBUTES,
    partition: tuple[float, float, float] | None = (0.6, 0.2, 0.2),
    size: int = 42,
    positive_rate: float = 0.3,
    seed: int = 0,
) -> Path:
    """CelebA's layout: img_align_celeba/NNNNNN.jpg, list_attr_celeba.txt, list_eval_partition.txt.

    Each attribute is present with probability ``positive_rate``; image ``k`` is a
    :func:`label_grid` of its attributes (in ``attributes`` order). ``partition`` gives the
    train/val/test shares written in file order like the real file (``None``: no partition file).
    """
    rng = np.random.default_rng(seed)
    values = rng.random((n, len(attributes))) < positive_rate
    names = [f"{k + 1:06d}.jpg" for k in range(n)]
    for name, row in zip(names, values, strict=True):
        _save(label_grid(row, size, rng), root / "img_align_celeba" / name)
    rows = [
        f"{name} " + " ".join(f"{1 if v else -1:2d}" for v in row)
        for name, row in zip(names, values, strict=True)
    ]
    (root / "list_attr_celeba.txt").write_text(f"{n}\n{' '.join(attributes)} \n" + "\n".join(rows) + "\n")
    if partition is not None:
        n_train = round(partition[0] * n)
        n_val = round(partition[1] * n)
        parts = [0] * n_train + [1] * n_val + [2] * (n - n_train - n_val)
        (root / "list_eval_partition.txt").write_text(
            "".join(f"{a} {p}\n" for a, p in zip(names, parts, strict=True))
        )
    return root


def make_voc(
    root: Path,
    train: int | Sequence[Sequence[str]] = 12,
    val: int | Sequence[Sequence[str]] | None = 6,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """PASCAL VOC's layout: JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/{train,val}.txt.

    ``train``/``val``: a number of images with 1-3 random classes each, or each image's class
    names. ``val=None`` writes no val.txt. Images are :func:`label_grid`\\ s over the 20 classes.
    """
    rng = np.random.default_rng(seed)
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    serial = 0
    for split, spec in (("train", train), ("val", val)):
        if spec is None:
            continue
        if isinstance(spec, int):
            spec = [
                [VOC_CLASSES[c] for c in rng.choice(len(VOC_CLASSES), rng.integers(1, 4), replace=False)]
                for _ in range(spec)
            ]
        ids = []
        for labels in spec:
            image_id = f"2008_{serial:06d}"
            serial += 1
            ids.append(image_id)
            present = [name in labels for name in VOC_CLASSES]
            _save(label_grid(present, size, rng), root / "JPEGImages" / f"{image_id}.jpg")
            (root / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, labels, size))
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _voc_xml(image_id: str, labels: Sequence[str], size: int) -> str:
    objects = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{k % 2}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        f"<xmax>{size - 1}</xmax><ymax>{size - 1}</ymax></bndbox></object>"
        for k, name in enumerate(labels)
    )
    return (
        f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objects}</annotation>\n"
    )


def make_caltech101(
    root: Path,
    classes: int | Sequence[str] = 3,
    per_class: int | Sequence[int] = 6,
    background: int = 4,
    size: Size = (30, 20),
    seed: int = 0,
) -> Path:
    """Caltech101 as the homework ships it: ``root/101_ObjectCategories/<class>/image_NNNN.jpg``
    with a ``BACKGROUND_Google`` folder of ``background`` noise images, and the split lists
    ``root/train.txt`` / ``root/test.txt`` (``<class>/image_NNNN.jpg`` a line, every third image of
    each class in test, the background's lines included as in the homework's files).

    Class ``i`` of the sorted class names (background left out) has colour ``class_color(i)``.
    """
    names = _class_names(classes)
    order = {name: i for i, name in enumerate(sorted(names))}
    rng = np.random.default_rng(seed)
    images = root / "101_ObjectCategories"
    train: list[str] = []
    test: list[str] = []
    counts = [("BACKGROUND_Google", background), *zip(names, _per_class(per_class, len(names)), strict=True)]
    for name, count in counts:
        for j in range(1, count + 1):
            entry = f"{name}/image_{j:04d}.jpg"
            if name == "BACKGROUND_Google":
                width, height = _wh(size)
                image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
            else:
                image = _solid(order[name], size, rng)
            _save(image, images / entry)
            (test if j % 3 == 0 else train).append(entry)
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")
    return root
