"""What the image classifier's loop trains on: :class:`Inputs` made from the dataset, and the loss.

:func:`make_inputs` turns an :class:`~objectives.vision.data.ImageData` into the loop's inputs
(images, or report 000's attribute vectors for ``model: attribute_mlp``), :func:`test_inputs`
swaps in the held-out test split (``test_metrics: true``), :func:`make_criterion` picks the loss
that fits the task. VOC's ``difficult`` flags travel with the targets: :func:`with_ignore` packs
them as extra target columns, so that one batch stream cuts both the same way, and
:func:`split_ignore` unpacks a batch. (Split off ``objectives/vision/train.py``, which re-exports
these names.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hpo.errors import HpoError
from objectives.vision.data import ImageData
from objectives.vision.losses import Criterion

if TYPE_CHECKING:  # train.py imports this module
    from objectives.vision.train import ImageClassifierConfig


@dataclass(frozen=True)
class Inputs:
    """What the loop trains on: images (uint8) or feature vectors (float), targets, and the task.

    ``train_ignore`` / ``val_ignore``: multi-label only, bool like the targets, True where a label
    counts neither as positive nor as negative (``ImageData.*_ignore``, VOC's ``difficult``); the
    loss, the label-wise accuracy and the mAP leave those pairs out. None: every label counts."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    images: bool
    multilabel: bool
    num_outputs: int
    train_ignore: torch.Tensor | None = None
    val_ignore: torch.Tensor | None = None


def make_inputs(cfg: ImageClassifierConfig, data: ImageData) -> Inputs:
    """Turn the dataset into the model's inputs and targets (see ``attribute_mlp``)."""
    multilabel = data.task == "multilabel"
    if cfg.model != "attribute_mlp":
        if not data.has_images:
            raise HpoError(
                f"model {cfg.model} needs images, but data.inputs is attributes "
                "(fix: data.inputs: images, or model: attribute_mlp)"
            )
        return Inputs(
            data.train_images,
            data.train_targets,
            data.val_images,
            data.val_targets,
            images=True,
            multilabel=multilabel,
            num_outputs=len(data.classes),
            train_ignore=data.train_ignore if multilabel else None,
            val_ignore=data.val_ignore if multilabel else None,
        )
    # Report 000: predict one CelebA attribute from the other attributes (no pixels).
    if not multilabel:
        raise HpoError(
            "model attribute_mlp reads CelebA's attributes, but this dataset is single-label "
            "(fix: data: {format: celeba}, with all attributes and no data.target_attribute)"
        )
    if cfg.target_attribute not in data.classes:
        raise HpoError(
            f"target_attribute {cfg.target_attribute!r} is not an attribute of this dataset "
            f"(fix: use data format celeba and one of: {', '.join(data.classes)})"
        )
    target = data.classes.index(cfg.target_attribute)
    others = [i for i in range(len(data.classes)) if i != target]

    def split(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = targets.float()
        return targets[:, others], targets[:, target : target + 1]

    train_x, train_y = split(data.train_targets)
    val_x, val_y = split(data.val_targets)
    return Inputs(train_x, train_y, val_x, val_y, images=False, multilabel=True, num_outputs=1)


def make_criterion(cfg: ImageClassifierConfig, inputs: Inputs) -> Criterion:
    loss = cfg.loss
    if loss == "auto":
        loss = "bce" if inputs.multilabel else "cross_entropy"
    if inputs.multilabel and loss != "bce":
        raise HpoError(
            f"loss: {loss} needs single-label classes, but this dataset is multi-label (fix: loss: bce)"
        )
    if not inputs.multilabel and loss == "bce":
        raise HpoError("loss: bce is for multi-label datasets (voc, celeba) (fix: loss: cross_entropy)")
    return Criterion(loss, cfg.center_loss_lambda, cfg.triplet_margin)


def with_ignore(y: torch.Tensor, ignore: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``y`` with the ignore flags as extra columns, so that one stream of batches
    (:func:`~objectives.vision._gpu.device_batches`) cuts both the same way, and the targets'
    width; ``y`` itself (width 0) without flags."""
    if ignore is None:
        return y, 0
    return torch.cat([y, ignore.to(device=y.device, dtype=y.dtype)], dim=1), y.shape[1]


def split_ignore(batch: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Undo :func:`with_ignore` on one batch: its targets and its flags (None without flags)."""
    if width == 0:
        return batch, None
    return batch[:, :width], batch[:, width:] > 0.5


def held_out_inputs(cfg: ImageClassifierConfig, data: ImageData, inputs: Inputs) -> Inputs | None:
    """``inputs`` with the held-out test split in place of validation (``test_metrics: true``)."""
    if not cfg.test_metrics:
        return None
    if data.test_images is None or data.test_targets is None or not inputs.images:
        raise HpoError(
            "test_metrics: true needs a held-out test split of images "
            "(fix: data: {format: caltech101, train_list: ..., test_list: ...}, or drop test_metrics)"
        )
    test_ignore = data.test_ignore if inputs.multilabel else None
    return dataclasses.replace(
        inputs, val_x=data.test_images, val_y=data.test_targets, val_ignore=test_ignore
    )
