"""Training losses: cross-entropy, multi-label BCE (report 001), center loss and triplet loss (report 003).

``Criterion(name, ...)`` is called with a batch's logits, the features entering the last layer (the
embedding), the targets and the model's :class:`CenterLoss` (when the model has one). Validation uses
:meth:`Criterion.eval_loss`, the cross-entropy (or BCE) of the logits alone, so that validation losses
of trials with different losses or ``center_loss_lambda`` stay comparable.

* ``center``: cross-entropy + ``lambda`` x center loss (Wen et al., 2016). The centres are buffers
  moved by their own rule at rate ``alpha`` (:meth:`CenterLoss.update`), not by the optimizer.
* ``triplet``: batch-hard triplet loss (Hermans et al., 2017) on the embedding, plus the
  cross-entropy of a linear read-out trained on the *detached* embedding: the embedding is shaped by
  the triplet loss alone, the read-out only turns it into class scores (top-1/top-5, val_loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossName = Literal["cross_entropy", "bce", "center", "triplet"]


class CenterLoss(nn.Module):
    """Center loss (Wen et al., 2016): ``1/2 * mean_i ||f_i - c_{y_i}||^2`` with its own centre update.

    The centres are *buffers* (saved in checkpoints, never seen by the optimizer). Each training
    step, after the loss is computed, :meth:`update` moves every class ``j`` present in the batch by
    Wen et al.'s rule ``c_j <- c_j - alpha * sum_{i: y_i=j} (c_j - f_i) / (1 + n_j)``, independently
    of the loss weight lambda.

    Initialisation: a class's centre is set to the mean of its features in the first training batch
    that contains it (``initialized`` records which classes have been seen). Zeros would make the
    first epochs pull every feature towards the origin (post-ReLU features are far from it, so the
    term would dwarf the cross-entropy); random centres (the old ``randn``) are worse still. The
    first batch's class mean is where the class is when its centre starts to matter.
    """

    centers: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, num_classes: int, feature_dim: int, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"center loss alpha must be in [0, 1], not {alpha}")
        self.alpha = alpha
        self.register_buffer("centers", torch.zeros(num_classes, feature_dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def _class_sums(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = torch.zeros_like(self.centers).index_add_(0, targets, features.detach().to(self.centers.dtype))
        # index_add_, not bincount: bincount syncs with the host on CUDA and is not deterministic.
        counts = torch.zeros(len(self.centers), dtype=sums.dtype, device=sums.device).index_add_(
            0, targets, torch.ones_like(targets, dtype=sums.dtype)
        )
        return sums, counts

    @torch.no_grad()
    def initialize(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Set the centre of every class first seen in this batch to its batch mean (no host sync)."""
        sums, counts = self._class_sums(features, targets)
        new = (counts > 0) & ~self.initialized
        means = sums / counts.clamp(min=1.0).unsqueeze(1)
        self.centers.copy_(torch.where(new.unsqueeze(1), means, self.centers))
        self.initialized |= counts > 0

    @torch.no_grad()
    def update(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Wen et al.'s centre update for the classes in this batch (rate ``alpha``)."""
        sums, counts = self._class_sums(features, targets)
        delta = (counts.unsqueeze(1) * self.centers - sums) / (1.0 + counts).unsqueeze(1)
        self.centers.sub_(self.alpha * delta)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss on the current centres; in training mode also initialises and then updates them."""
        if self.training:
            self.initialize(features, targets)
        # Advanced indexing copies: the in-place update below does not touch what autograd saved.
        diff = features.to(self.centers.dtype) - self.centers[targets]  # float32 under bf16 autocast
        loss = 0.5 * diff.pow(2).sum(dim=1).mean()
        if self.training:
            self.update(features, targets)
        return loss


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between all rows, float32, with a finite gradient where a distance is 0."""
    x = embeddings.float()
    squares = x.pow(2).sum(dim=1)
    d2 = squares.unsqueeze(1) + squares.unsqueeze(0) - 2.0 * (x @ x.T)
    # clamp: rounding can make d2 slightly negative, and sqrt's gradient at 0 is infinite; the clamp
    # passes no gradient below 1e-12, so identical embeddings get a zero (not NaN) gradient.
    return d2.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(embeddings: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) with a hinge at ``margin``.

    For every anchor ``a``: the hardest positive is the farthest sample of its class (``p != a``), the
    hardest negative the nearest sample of another class; the anchor's loss is
    ``max(0, margin + d(a, p) - d(a, n))`` with Euclidean distances. The result is the mean over the
    anchors that have both a positive and a negative in the batch; anchors whose class has a single
    sample in the batch (or a batch of one class) form no triplet and are left out. A batch without
    any triplet gives 0 (with a gradient of zero), not NaN.
    """
    with torch.autocast(device_type=embeddings.device.type, enabled=False):  # distances in float32
        dist = pairwise_distances(embeddings)
        same = targets.unsqueeze(0) == targets.unsqueeze(1)
        eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
        positive = same & ~eye
        negative = ~same
        hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
        hardest_negative = dist.masked_fill(~negative, float("inf")).amin(dim=1)
        valid = positive.any(dim=1) & negative.any(dim=1)
        hinge = F.relu(margin + hardest_positive - hardest_negative)
        hinge = torch.where(valid, hinge, torch.zeros_like(hinge))  # no inf - inf for invalid anchors
        return hinge.sum() / valid.sum().clamp(min=1)


@dataclass(frozen=True)
class Criterion:
    """The training loss; see the module docstring for ``center`` and ``triplet``."""

    name: LossName
    center_lambda: float = 0.0
    triplet_margin: float = 0.2

    @property
    def multilabel(self) -> bool:
        return self.name == "bce"

    def __call__(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        targets: torch.Tensor,
        centers: CenterLoss | None,
        ignore: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The batch's training loss; with ``center`` this also moves the centres (training mode).

        ``ignore``: see :meth:`eval_loss`."""
        loss = self.eval_loss(logits, targets, ignore=ignore)
        if self.name == "center":
            if centers is None:
                raise ValueError("center loss needs a model built with center_loss=True")
            loss = loss + self.center_lambda * centers(features, targets)
        elif self.name == "triplet":
            loss = loss + batch_hard_triplet_loss(features, targets, self.triplet_margin)
        return loss

    def eval_loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        reduction: str = "mean",
        ignore: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The classification term: cross-entropy, or BCE with logits averaged over labels.

        ``ignore`` (BCE only; bool, the shape of ``targets``: VOC's ``difficult`` labels): the BCE is
        the mean over the (sample, label) pairs not flagged, which neither push a logit up nor down
        (no gradient). ``reduction="sum"`` is that mean times the number of samples, so that a sum
        over samples divided by their number is the mean in either case (no host sync)."""
        if not self.multilabel:
            if ignore is not None:
                raise ValueError("ignore flags apply to multi-label targets (loss: bce) only")
            loss = F.cross_entropy(logits.float(), targets, reduction="none")
            return loss.sum() if reduction == "sum" else loss.mean()
        entries = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        if ignore is None:
            loss = entries.mean(dim=1)
            return loss.sum() if reduction == "sum" else loss.mean()
        kept = ~ignore
        # where, not a product: an ignored pair contributes an exact 0 and no gradient.
        mean = torch.where(kept, entries, torch.zeros_like(entries)).sum() / kept.sum().clamp(min=1)
        return mean * len(targets) if reduction == "sum" else mean
