"""Image datasets for the vision objectives: local files only, decoded once per worker.

A study file's ``data:`` section is a :class:`DataConfig`; :func:`load_image_data` turns it into
an :class:`ImageData` of uint8 image tensors and targets for a training split and a validation
split. Nothing is ever downloaded: the data is read from ``data.root`` (absolute, or relative to
``$HPO_DATA_ROOT``), or from ``$HPO_DATA_ROOT/<default folder>`` when ``root`` is left out.

Fast path: every image is decoded and resized exactly once per worker (in a thread pool) into one
uint8 tensor, moved to the GPU when it fits, and kept in the worker's per-study cache
(``TrialRun.cache``), so every later trial of the study starts without touching the disk.

Formats and layouts (see ``docs/datasets.md``): ``imagefolder`` (15-Scene, STL-10 exported to
folders), ``caltech101`` (its tree, optionally with the homework's split lists), ``tiny_imagenet``,
``celeba``, ``voc``, ``stl10`` (its binary files) and ``digits`` (scikit-learn's). ``pretext`` turns any
of them into a self-supervised task (report 002): see :mod:`objectives.vision._pretext`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hpo.errors import SpecError
from hpo.launcher import device_memory_budget, slots_on_device
from hpo.shared_data import load_shared, shared_data_dir
from objectives.vision import _pretext, _split
from objectives.vision._decode import DecodeError, decode_images, fit_arrays
from objectives.vision._formats import (
    CALTECH_EXCLUDED,
    CELEBA_ATTRIBUTES,
    LAYOUTS,
    VOC_CLASSES,
    Catalog,
    Split,
    read_catalog,
)

__all__ = [
    "CALTECH_EXCLUDED",
    "CELEBA_ATTRIBUTES",
    "DATA_ROOT_ENV",
    "DEFAULT_DIRS",
    "VOC_CLASSES",
    "DataConfig",
    "ImageData",
    "load_image_data",
    "resolve_root",
]

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "HPO_DATA_ROOT"
"""Environment variable naming the folder that holds the datasets (per machine)."""

DEFAULT_DIRS: dict[str, str] = {
    "tiny_imagenet": "tiny-imagenet-200",
    "celeba": "celeba",
    "voc": "VOCdevkit/VOC2012",
    "caltech101": "caltech101",
    "stl10": "stl10_binary",
}
"""Folder under ``$HPO_DATA_ROOT`` used when ``data.root`` is not given (the archives' own names)."""

# Images go to the GPU only when they take at most this share of its free memory; the rest is
# left for the model, activations and the augmentation buffers.
_GPU_SHARE = 0.5
_SPLIT_FORMATS = ("imagefolder", "voc")
_EXCLUDE_FORMATS = ("imagefolder", "caltech101")
# Images are decoded and center-cropped in chunks of this many when ``resize`` is set, so the
# larger decoded copy never exists for the whole dataset at once.
_CROP_CHUNK = 1024


class DataConfig(BaseModel):
    """The study file's ``data:`` section for the vision objectives (validated at load time)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["imagefolder", "caltech101", "tiny_imagenet", "celeba", "voc", "stl10", "digits"]
    root: str | None = None
    """Dataset folder: absolute, ``~/...``, or relative to ``$HPO_DATA_ROOT`` (else to the working
    directory). Left out: ``$HPO_DATA_ROOT/<DEFAULT_DIRS[format]>``; required for imagefolder."""
    image_size: int = Field(default=64, ge=4, le=1024)
    """Images are resized (shorter side) and center-cropped to ``image_size x image_size``."""
    resize: int | None = Field(default=None, ge=4, le=2048)
    """Resize the shorter side to ``resize`` first, then center-crop ``image_size`` (report 004's
    ``Resize(256)`` + ``CenterCrop(224)``). Left out: resized straight to ``image_size``."""
    channels: Literal[1, 3] = 3
    """3: RGB; 1: greyscale (report 003), converted once when the images are decoded."""
    subset: float = Field(default=1.0, gt=0.0, le=1.0)
    """Stratified fraction of train and of validation that is used; every class is kept."""
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Stratified share of train split off as validation, only when the dataset has no val split."""
    attributes: list[str] | None = Field(default=None, min_length=1)
    """CelebA: the attribute columns that form the multilabel target (default: all 40)."""
    target_attribute: str | None = None
    """CelebA: one attribute as a 2-class multiclass target (``not_NAME``, ``NAME``)."""
    inputs: Literal["images", "attributes"] = "images"
    """CelebA: ``attributes`` loads the attribute table only and decodes no image (report 000's
    attribute MLP, ``model: attribute_mlp``); the image tensors are then empty ``(N, 0, 0, 0)``
    placeholders, ``ImageData.has_images`` is false, and the image folder need not exist."""
    voc_difficult: Literal["ignore", "negative", "positive"] = "ignore"
    """VOC: an image whose only instances of a class are marked ``difficult``. ``ignore`` (the VOC
    devkit's rule; report 001 does not state one): neither positive nor negative, flagged in
    ``ImageData.*_ignore`` for the loss and the mAP to leave out; ``negative``: a negative (what
    ``ImageSets/Main/<class>_<split>.txt``'s label 0 read as "not 1" gives); ``positive``: a positive."""
    pretext: Literal["none", "rotation", "perturbation"] = "none"
    """Report 002's self-supervised pretext tasks, which replace the dataset's labels: ``rotation``
    shows every image at 0/90/180/270 degrees (4 classes, the rotation index); ``perturbation``
    pastes one solid black or white square at a random place in every image (2 classes, its colour).
    See ``docs/datasets.md``."""
    unlabeled: bool = False
    """stl10 with a ``pretext`` task: add ``unlabeled_X.bin``'s 100,000 images (a ``subset`` share of
    them) to the pretext task's training split; they have no class labels, so nothing else can use them."""
    perturbation_size: float = Field(default=0.25, gt=0.0, le=1.0)
    """pretext perturbation: the square's side as a share of ``image_size`` (the report gives none)."""
    train_split: str = "train"
    """imagefolder: the training folder's name (used when ``root/<train_split>/`` exists).
    voc: the ``ImageSets/Main/<train_split>.txt`` id list."""
    val_split: str | None = None
    """imagefolder: the validation folder (default: the first of val, valid, validation, test that
    exists). voc: the id list (default: val.txt when present). Absent: split off train."""
    exclude_classes: list[str] | None = None
    """imagefolder, caltech101: class folders left out. Left out: caltech101 drops
    ``BACKGROUND_Google`` (report 004), imagefolder keeps every folder; ``[]`` keeps all."""
    train_list: str | None = None
    """caltech101: the homework's training list (``<class>/<image file>`` a line, relative to
    ``root/101_ObjectCategories``), path relative to ``root``. Validation is split off it
    (``val_fraction``; report 004 halved it: 0.5). Left out: the whole tree, split likewise."""
    test_list: str | None = None
    """caltech101: the homework's test list (same format), read and checked as the held-out test
    split; the search never uses it (``load_image_data(..., test=True)`` decodes it, which the
    objective's ``test_metrics: true`` asks for)."""

    @model_validator(mode="after")
    def _options_fit_format(self) -> DataConfig:
        celeba_only = {"attributes", "target_attribute", "inputs"} & self.model_fields_set
        if self.format != "celeba" and celeba_only:
            raise ValueError(f"{sorted(celeba_only)[0]} applies only to format celeba")
        split_names = {"train_split", "val_split"} & self.model_fields_set
        if self.format not in _SPLIT_FORMATS and split_names:
            raise ValueError(f"{sorted(split_names)[0]} applies only to formats imagefolder and voc")
        if self.attributes is not None and self.target_attribute is not None:
            raise ValueError("give either attributes (multilabel) or target_attribute (2 classes), not both")
        if self.attributes is not None and len(set(self.attributes)) != len(self.attributes):
            raise ValueError("attributes must not repeat a name")
        if self.format == "digits" and self.root is not None:
            raise ValueError("root does not apply to format digits (the data ships with scikit-learn)")
        if self.format not in _EXCLUDE_FORMATS and "exclude_classes" in self.model_fields_set:
            raise ValueError("exclude_classes applies only to formats imagefolder and caltech101")
        lists = {"train_list", "test_list"} & self.model_fields_set
        if self.format != "caltech101" and lists:
            raise ValueError(f"{sorted(lists)[0]} applies only to format caltech101")
        if self.test_list is not None and self.train_list is None:
            raise ValueError("test_list needs train_list (the classes and the validation split come from it)")
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(
                f"resize ({self.resize}) must be at least image_size ({self.image_size}): the crop is taken "
                "from the resized image"
            )
        if self.resize is not None and self.format == "digits":
            raise ValueError("resize does not apply to format digits (8x8 images are upscaled)")
        if self.format != "voc" and "voc_difficult" in self.model_fields_set:
            raise ValueError("voc_difficult applies only to format voc")
        if self.unlabeled and (self.format != "stl10" or self.pretext == "none"):
            raise ValueError(
                "unlabeled applies only to format stl10 with a pretext task (its images have no class labels)"
            )
        if self.pretext != "perturbation" and "perturbation_size" in self.model_fields_set:
            raise ValueError("perturbation_size applies only to pretext: perturbation")
        if self.inputs == "attributes":
            pixel_options = {"image_size", "resize", "channels"} & self.model_fields_set
            if pixel_options:
                raise ValueError(
                    f"{sorted(pixel_options)[0]} does not apply with inputs: attributes (no image is decoded)"
                )
            if self.pretext != "none":
                raise ValueError("pretext needs images; it does not apply with inputs: attributes")
        return self


@dataclass(frozen=True)
class ImageData:
    """A training and a validation split held in memory as tensors on one device.

    Images are uint8 ``(N, C, H, W)`` (``C`` = ``data.channels``, 3 or 1) with
    ``H == W == image_size``, contiguous; convert to float and normalise on the device per batch.
    Targets are int64 class indices ``(N,)`` for ``task == "multiclass"`` and float32 0/1 ``(N, K)``
    for ``"multilabel"``, with column ``k`` (or class index ``k``) named by ``classes[k]``.
    """

    train_images: torch.Tensor
    train_targets: torch.Tensor
    val_images: torch.Tensor
    val_targets: torch.Tensor
    classes: tuple[str, ...]
    task: Literal["multiclass", "multilabel"]
    test_images: torch.Tensor | None = None  # the held-out test split (caltech101's test_list)
    test_targets: torch.Tensor | None = None
    # voc_difficult: ignore: bool (N, K), True where label k of image n counts neither as positive
    # nor as negative (its target there is 0); None when every target counts.
    train_ignore: torch.Tensor | None = None
    val_ignore: torch.Tensor | None = None
    test_ignore: torch.Tensor | None = None
    has_images: bool = True  # False with inputs: attributes (image tensors are empty placeholders)
    # The machine-wide copy these tensors are mapped from (hpo.shared_data), kept while they are.
    lease: Any = dataclasses.field(default=None, compare=False, repr=False)

    def to(self, device: str | torch.device) -> ImageData:
        """The same data with every tensor on ``device`` (no copy for tensors already there)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_targets=self.train_targets.to(device),
            val_images=self.val_images.to(device),
            val_targets=self.val_targets.to(device),
            test_images=move(self.test_images),
            test_targets=move(self.test_targets),
            train_ignore=move(self.train_ignore),
            val_ignore=move(self.val_ignore),
            test_ignore=move(self.test_ignore),
        )

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_root(config: DataConfig, source: str = "study file") -> Path | None:
    """The dataset folder ``config`` refers to (``None`` for digits); raises :class:`SpecError`."""
    if config.format == "digits":
        return None
    base = os.environ.get(DATA_ROOT_ENV) or None
    if config.root is None:
        default = DEFAULT_DIRS.get(config.format)
        if default is None:
            raise SpecError(
                source,
                "data.root",
                f"is required for format {config.format} (expected layout: {LAYOUTS[config.format]})",
                f"set data.root to the dataset folder, absolute or relative to ${DATA_ROOT_ENV}",
            )
        if base is None:
            raise SpecError(
                source,
                "data.root",
                f"is not set and neither is ${DATA_ROOT_ENV}",
                f"set data.root, or export {DATA_ROOT_ENV}=/path/to/datasets holding {default}/",
            )
        return (Path(base).expanduser() / default).absolute()
    path = Path(os.path.expandvars(config.root)).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base).expanduser() / path
    return path.absolute()


def load_image_data(
    config: DataConfig,
    seed: int,
    cache: MutableMapping[str, Any] | None = None,
    device: str = "cpu",
    source: str = "study file",
    *,
    workers: int | None = None,
    test: bool = False,
) -> ImageData:
    """Decode, resize, split and subset the dataset ``config`` names; deterministic in ``seed``.

    With ``cache`` (a worker's ``TrialRun.cache``) the result is stored under a key of (config,
    seed, resolved root, device) and a later call with the same key returns the very same tensors
    without reading any file. Tensors are placed on ``device``; on a CUDA device whose free memory
    cannot take the images comfortably (more than half of it), everything stays on the CPU and a
    warning is logged: check ``data.device`` and move batches. ``workers`` decoding threads
    (default: the usable CPUs, at most 32). ``test``: also decode the held-out test split
    (caltech101's ``test_list``) into ``test_images``/``test_targets``; its list is read and
    checked either way, but the search never looks at it, so by default it is not decoded.

    Raises :class:`hpo.errors.SpecError` (field ``data.root``, or the option at fault) naming the
    missing or malformed path and the expected layout, or the image that cannot be decoded.
    """
    root = resolve_root(config, source)
    key = f"objectives.vision.data:{config.model_dump_json()}:{seed}:{root}:{device}:{test}"
    if cache is not None and key in cache:
        cached: ImageData = cache[key]
        return cached

    catalog = _digits_catalog() if config.format == "digits" else read_catalog(config, root or Path(), source)

    _check_learnable(catalog, config, root, source)

    def decode() -> ImageData:
        train_pool, val_pool = _pools(catalog, config.val_fraction, _stream(seed, 0))
        train_split, train_idx = train_pool
        val_split, val_idx = val_pool
        # Each selection has its own random stream, so none depends on how much another one drew.
        train_idx = train_idx[_split.sample(train_split.targets[train_idx], config.subset, _stream(seed, 1))]
        val_idx = val_idx[_split.sample(val_split.targets[val_idx], config.subset, _stream(seed, 2))]

        test_images = test_targets = test_ignore = None
        test_idx = np.arange(0)
        if test and catalog.test is not None:
            test_idx = _split.sample(catalog.test.targets, config.subset, _stream(seed, 3))
            test_images = _images(catalog.test, test_idx, config, workers, source)
            test_targets = _targets(catalog.test.targets[test_idx], catalog.task)
            test_ignore = _ignore(catalog.test, test_idx)

        data = ImageData(
            train_images=_images(train_split, train_idx, config, workers, source),
            train_targets=_targets(train_split.targets[train_idx], catalog.task),
            val_images=_images(val_split, val_idx, config, workers, source),
            val_targets=_targets(val_split.targets[val_idx], catalog.task),
            classes=catalog.classes,
            task=catalog.task,
            test_images=test_images,
            test_targets=test_targets,
            train_ignore=_ignore(train_split, train_idx),
            val_ignore=_ignore(val_split, val_idx),
            test_ignore=test_ignore,
            has_images=config.inputs == "images",
        )
        if len(data.val_targets) == 0:
            # Every trial would be scored on nothing: val_loss 0, the best value there is.
            raise SpecError(
                source,
                "data.val_fraction",
                f"leaves no validation images under {root} (a class gives validation an image only "
                "when it has 2 or more)",
                "add images (at least 2 per class), or give a validation split of its own",
            )
        extra: list[tuple[torch.Tensor, _pretext.Draw]] = []
        if catalog.unlabeled is not None:  # stl10, unlabeled: true (pretext tasks only)
            pool = catalog.unlabeled
            unlabeled_idx = _split.sample(pool.targets, config.subset, _stream(seed, 7))
            images = _images(pool, unlabeled_idx, config, workers, source)
            extra.append((images, (_stream(seed, 8), len(pool), unlabeled_idx)))
        if config.pretext != "none":
            # Per-image draws are indexed by the image's position in its split on disk, so an image
            # gets the same square whatever subset or validation split it ends up in.
            # Validation split off train draws from train's stream: same image, same square.
            val_purpose = 4 if val_split is catalog.train else 5
            data = _pretext.apply(
                data,
                config.pretext,
                (
                    (_stream(seed, 4), len(train_split), train_idx),
                    (_stream(seed, val_purpose), len(val_split), val_idx),
                    (_stream(seed, 6), len(catalog.test) if catalog.test is not None else 0, test_idx),
                ),
                config.perturbation_size,
                extra_train=extra,
            )
        return data

    shared_key = f"{config.model_dump_json()}:{seed}:{root}:{test}"
    data = _shared_or_private(decode, catalog, shared_key, images=config.inputs == "images")
    data = _place(data, device)
    if cache is not None:
        cache[key] = data
    return data


_TENSOR_FIELDS = tuple(
    f"{split}_{part}" for split in ("train", "val", "test") for part in ("images", "targets", "ignore")
)


def _shared_or_private(
    decode: Callable[[], ImageData], catalog: Catalog, key: str, images: bool = True
) -> ImageData:
    """``decode()``'s data, from the machine-wide copy when there is one (:mod:`hpo.shared_data`):
    the first trainer on the machine decodes and writes it, the others map the same memory.

    The key holds the data settings, the seed and a fingerprint of the dataset on disk (every
    image file's size and modification time, the labels), so an edited dataset is decoded anew.
    ``images=False`` (``inputs: attributes``): no image is read, so none is looked at (CelebA's
    202,599 ``stat`` calls took 1-2 s per trainer start).
    """
    directory = shared_data_dir()
    fingerprint = None if directory is None else _fingerprint(catalog, images)
    if directory is None or fingerprint is None:
        return decode()

    def build() -> tuple[dict[str, torch.Tensor | None], dict[str, Any]]:
        data = decode()
        meta = {"classes": list(data.classes), "task": data.task, "has_images": data.has_images}
        return {name: getattr(data, name) for name in _TENSOR_FIELDS}, meta

    tensors, meta, lease = load_shared(directory, f"objectives.vision.data:{key}:{fingerprint}", build)
    return ImageData(
        **tensors,  # type: ignore[arg-type]
        classes=tuple(meta["classes"]),
        task=meta["task"],
        has_images=bool(meta["has_images"]),
        lease=lease,
    )


def _fingerprint(catalog: Catalog, images: bool = True) -> str | None:
    """A digest of what the decoded data is made from, None when a file cannot be read (the
    decoder then reports it). ``images=False``: the labels only (the image files are not read)."""
    digest = hashlib.sha256()
    try:
        for split in (catalog.train, catalog.val, catalog.test, catalog.unlabeled):
            if split is None:
                digest.update(b"-")
                continue
            digest.update(np.ascontiguousarray(split.targets).tobytes())
            if split.ignore is not None:
                digest.update(np.ascontiguousarray(split.ignore).tobytes())
            for path in split.files if images else ():
                st = os.stat(path)
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            if split.pixels is not None and images:
                filename = getattr(split.pixels, "filename", None)  # STL-10's memory-mapped binary
                if filename is not None:
                    st = os.stat(filename)
                    digest.update(f"{filename}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                else:  # in memory (digits, from scikit-learn): small
                    digest.update(np.ascontiguousarray(split.pixels).tobytes())
    except OSError:
        return None
    return digest.hexdigest()


def _stream(seed: int, purpose: int) -> np.random.Generator:
    """An independent random stream per purpose (0: val split, 1: train subset, 2: val subset,
    3: test subset; 4, 5, 6: pretext draws for the train, val and test split on disk; 7: unlabeled
    subset; 8: its pretext draws)."""
    return np.random.default_rng([seed % 2**63, purpose])


def _check_learnable(catalog: Catalog, config: DataConfig, root: Path | None, source: str) -> None:
    """A single-label dataset of one class (a tree with one class folder) trains to a loss of 0
    whatever the hyperparameters: every trial would look perfect. Refused, before any decoding."""
    if catalog.task == "multiclass" and len(catalog.classes) < 2 and config.pretext == "none":
        raise SpecError(
            source,
            "data.root",
            f"{root} has {len(catalog.classes)} class ({', '.join(map(str, catalog.classes))}): "
            "nothing to tell apart",
            "point data.root at the folder that holds one folder per class, at least 2 of them",
        )


def _pools(
    catalog: Catalog, val_fraction: float, rng: np.random.Generator
) -> tuple[tuple[Split, np.ndarray], tuple[Split, np.ndarray]]:
    """(split, indices) for train and for validation, splitting train when there is no val."""
    if catalog.val is not None:
        return (catalog.train, np.arange(len(catalog.train))), (catalog.val, np.arange(len(catalog.val)))
    train_idx, val_idx = _split.split(catalog.train.targets, val_fraction, rng)
    return (catalog.train, train_idx), (catalog.train, val_idx)


def _ignore(split: Split, indices: np.ndarray) -> torch.Tensor | None:
    return None if split.ignore is None else torch.from_numpy(np.ascontiguousarray(split.ignore[indices]))


def _images(
    split: Split, indices: np.ndarray, config: DataConfig, workers: int | None, source: str
) -> torch.Tensor:
    if config.inputs == "attributes":
        return torch.empty((len(indices), 0, 0, 0), dtype=torch.uint8)
    if split.pixels is not None and split.pixels.ndim == 3:  # digits: 8x8 grey
        return _upscale(split.pixels[indices], config.image_size, config.channels)
    if split.pixels is not None:  # STL-10: (N, 3, 96, 96) in memory
        chosen = split.pixels[indices]  # reads only the selected images of the memory-mapped file

        def fit(start: int, stop: int, size: int) -> np.ndarray:
            return fit_arrays(chosen[start:stop], size, workers, config.channels)

        return torch.from_numpy(
            _resize_crop(fit, len(indices), config.resize, config.image_size, config.channels)
        )
    files = [split.files[i] for i in indices]
    missing = next((f for f in files if not os.path.isfile(f)), None)
    if missing is not None:  # fail before spending minutes decoding the rest
        raise SpecError(
            source,
            "data.root",
            f"image {missing} is listed by the dataset but does not exist",
            _layout(config),
        )

    def decode(start: int, stop: int, size: int) -> np.ndarray:
        return decode_images(files[start:stop], size, workers, config.channels)

    try:
        return torch.from_numpy(
            _resize_crop(decode, len(files), config.resize, config.image_size, config.channels)
        )
    except DecodeError as exc:
        raise SpecError(
            source, "data.root", f"{exc.path}: {exc.reason}", "replace or remove the file"
        ) from None


def _resize_crop(
    decode: Callable[[int, int, int], np.ndarray], n: int, resize: int | None, size: int, channels: int
) -> np.ndarray:
    """Shorter side to ``resize``, then the centre ``image_size`` square (torchvision's
    ``Resize(resize)`` + ``CenterCrop(image_size)``, whose offset is ``round((resize - size) / 2)``).
    ``decode(start, stop, side)``: images ``start:stop`` at ``side x side``; ``resize`` None: straight
    to ``size``.

    The decoder already center-crops the longer side to a ``resize`` square; cropping its centre
    again takes the same central region. Decoded chunk by chunk, so only one chunk at the larger
    size is held at a time.
    """
    if resize is None or resize == size:
        return decode(0, n, size)
    top = round((resize - size) / 2.0)
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    for start in range(0, n, _CROP_CHUNK):
        chunk = decode(start, min(start + _CROP_CHUNK, n), resize)
        out[start : start + len(chunk)] = chunk[:, :, top : top + size, top : top + size]
    return out


def _layout(config: DataConfig) -> str:
    return f"expected {config.format} layout: {LAYOUTS[config.format]}"


def _targets(targets: np.ndarray, task: str) -> torch.Tensor:
    if task == "multiclass":
        return torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))
    return torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))


def _digits_catalog() -> Catalog:
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing is downloaded

    digits = load_digits()
    # 0..16 ink levels to 0..255 grey levels, kept as 8x8 until the subset is drawn.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train = Split(files=(), targets=digits.target.astype(np.int64), pixels=pixels)
    return Catalog(tuple(str(d) for d in range(10)), "multiclass", train, None)


def _upscale(pixels: np.ndarray, size: int, channels: int = 3) -> torch.Tensor:
    """``(N, 8, 8)`` grey uint8 to ``(N, channels, size, size)`` uint8 (bilinear), grey in every channel."""
    grey = torch.from_numpy(pixels).unsqueeze(1).float()
    resized = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1).contiguous()


def _place(data: ImageData, device: str) -> ImageData:
    target = torch.device(device)
    if target.type == "cpu":
        return data
    if target.type == "cuda":
        held = (data.train_images, data.val_images, data.test_images)
        needed = sum(t.numel() * t.element_size() for t in held if t is not None)
        free, total = torch.cuda.mem_get_info(target)
        budget = device_memory_budget(free, total, _GPU_SHARE)
        if needed > budget:
            logger.warning(
                "dataset images take %.1f GiB, more than this slot's %.1f GiB of %s (half of the free "
                "memory and of its share among %d slot(s)): keeping them in CPU memory (batches are "
                "copied per step)",
                needed / 2**30,
                budget / 2**30,
                target,
                slots_on_device(),
            )
            return data
    return data.to(target)
