"""Report 002's self-supervised pretext tasks, applied to decoded images (private to objectives.vision).

The pretext task replaces the dataset's labels with labels made from the images themselves:

* ``rotation`` (4 classes): every image is shown four times, turned by 0, 90, 180 and 270 degrees
  counter-clockwise (``torch.rot90`` over height and width); the label is the rotation index
  0..3. The split is four times larger; image ``n``'s copies are rows ``4n .. 4n + 3``.
* ``perturbation`` (2 classes): one solid square, black (0) or white (255) in every channel, is
  pasted at a random place in every image; the label is its colour, 0 black, 1 white. Report 002
  section 3: "predicting the color of a square with a solid color in a random location" and
  "the perturbation task focused on detecting white or black squares". Its side is
  ``perturbation_size * image_size`` pixels (at least 1; the report gives no size) and it lies
  wholly inside the image.

The colour and place are drawn per image from a stream seeded by the study's seed and the split
the image comes from, indexed by the image's position in that split on disk: the same image gets
the same square in every trial, whatever subset or validation split selected it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from objectives.vision.data import ImageData

ROTATION_CLASSES: tuple[str, ...] = ("rot0", "rot90", "rot180", "rot270")
PERTURBATION_CLASSES: tuple[str, ...] = ("black_square", "white_square")

# (stream for the split on disk, its length, the selected positions in it)
Draw = tuple[np.random.Generator, int, np.ndarray]


def rotate(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C, H, W)`` square images to ``(4N, C, H, W)`` rotated copies and their int64 labels."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError("rotation needs square images")
    turned = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)], dim=1)
    labels = torch.arange(4, dtype=torch.int64).repeat(len(images))
    return turned.reshape(-1, *images.shape[1:]).contiguous(), labels


def square_draws(rng: np.random.Generator, n: int, image_size: int, side: int) -> np.ndarray:
    """``(n, 3)`` int64 rows (colour 0/1, top, left) for ``n`` images of a split on disk."""
    colour = rng.integers(0, 2, size=n)
    top = rng.integers(0, image_size - side + 1, size=n)
    left = rng.integers(0, image_size - side + 1, size=n)
    return np.stack([colour, top, left], axis=1).astype(np.int64)


def perturb(images: torch.Tensor, draws: np.ndarray, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``images`` with row ``n``'s square (``draws[n]``: colour, top, left) pasted in,
    and the colours as int64 labels."""
    out = images.clone()
    for n, (colour, top, left) in enumerate(draws.tolist()):
        out[n, :, top : top + side, left : left + side] = 255 if colour else 0
    return out, torch.from_numpy(np.ascontiguousarray(draws[:, 0]))


def square_side(image_size: int, share: float) -> int:
    return max(1, min(image_size, round(share * image_size)))


def transform(images: torch.Tensor, task: str, draw: Draw, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's pretext images and int64 labels (``draw``: see :func:`apply`)."""
    if task == "rotation":
        return rotate(images)
    rng, on_disk, chosen = draw
    side = square_side(int(images.shape[-1]), share)
    every = square_draws(rng, on_disk, int(images.shape[-1]), side)
    return perturb(images, every[chosen], side)


def apply(
    data: ImageData,
    task: str,
    draws: Sequence[Draw],
    share: float,
    extra_train: Sequence[tuple[torch.Tensor, Draw]] = (),
) -> ImageData:
    """``data`` with every split's images and targets replaced by the pretext task's.

    ``draws``: (stream, length on disk, selected positions) for train, val and test, in that order.
    ``extra_train``: more images without labels (STL-10's unlabeled ones) with their own draws,
    appended to the training split after the pretext transform.
    """
    train = transform(data.train_images, task, draws[0], share)
    val = transform(data.val_images, task, draws[1], share)
    test = None if data.test_images is None else transform(data.test_images, task, draws[2], share)
    if extra_train:
        more = [transform(images, task, draw, share) for images, draw in extra_train]
        train = (
            torch.cat([train[0], *(m[0] for m in more)]),
            torch.cat([train[1], *(m[1] for m in more)]),
        )
    return dataclasses.replace(
        data,
        train_images=train[0],
        train_targets=train[1],
        val_images=val[0],
        val_targets=val[1],
        test_images=None if test is None else test[0],
        test_targets=None if test is None else test[1],
        classes=ROTATION_CLASSES if task == "rotation" else PERTURBATION_CLASSES,
        task="multiclass",
        train_ignore=None,
        val_ignore=None,
        test_ignore=None,
    )
