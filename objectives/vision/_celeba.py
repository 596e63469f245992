"""CelebA's reader (private to :mod:`objectives.vision`; the format is ``celeba``).

Two layouts are accepted: the flat one (``img_align_celeba/``, ``list_attr_celeba.txt`` and
``list_eval_partition.txt`` side by side) and the archive's own folders (``Img/img_align_celeba/``,
``Anno/list_attr_celeba.txt``, ``Eval/list_eval_partition.txt``). Each file is looked for in the flat
place first, then in the archive's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from hpo.errors import SpecError

if TYPE_CHECKING:
    from objectives.vision._formats import Catalog, _Reader


def _first_of(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def _celeba_image_dir(reader: _Reader) -> Path:
    root = reader.root
    found = _first_of(root / "img_align_celeba", root / "Img" / "img_align_celeba")
    if found is not None:
        return reader.directory(found)
    archive = _first_of(root / "img_align_celeba.zip", root / "Img" / "img_align_celeba.zip")
    if archive is not None:
        raise reader.fail(
            f"{archive} is not unzipped",
            f"unzip it where it is (cd {archive.parent} && unzip {archive.name}), which makes "
            f"{archive.parent / 'img_align_celeba'}/",
        )
    raise reader.fail(
        f"neither {root / 'img_align_celeba'} (flat layout) nor {root / 'Img' / 'img_align_celeba'} "
        "(the archive's layout) exists",
        "put the aligned images in one of them",
    )


def read(reader: _Reader) -> Catalog:
    """CelebA in the flat layout or in the archive's own Img/, Anno/, Eval/ folders (each file is
    looked for in the flat place first). With ``inputs: attributes`` the image folder is not needed:
    nothing is decoded, so it is neither looked for nor listed."""
    from objectives.vision._formats import Catalog, Split  # _formats imports this module

    config, root = reader.config, reader.root
    attr_file = _first_of(root / "list_attr_celeba.txt", root / "Anno" / "list_attr_celeba.txt")
    if attr_file is None:
        raise reader.fail(
            f"neither {root / 'list_attr_celeba.txt'} (flat layout) nor "
            f"{root / 'Anno' / 'list_attr_celeba.txt'} (the archive's layout) exists",
            "put list_attr_celeba.txt next to img_align_celeba/, or keep the archive's Anno/, Eval/ and "
            "Img/img_align_celeba/ folders under data.root",
        )
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

    if config.inputs == "attributes":
        files = np.asarray([""] * len(image_names), dtype=object)  # never decoded, never looked for
    else:
        prefix = f"{_celeba_image_dir(reader)}{os.sep}"
        files = np.asarray([prefix + name for name in image_names], dtype=object)
    partition_file = _first_of(root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt")
    if partition_file is None:
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
            f"list_attr_celeba.txt under {reader.root} has no attribute {unknown[0]!r}",
            f"use attributes from: {' '.join(names)}",
        )
    return list(wanted)
