"""Training losses: cross-entropy, multi-label BCE (report 001) and center loss (report 003).

``Criterion(name, center_lambda)`` is called with a batch's logits, the features entering the last
layer, the targets and the model's :class:`CenterLoss` (when the model has one). Validation uses
:meth:`Criterion.eval_loss`, the classification term alone, so that validation losses of trials with
different ``center_loss_lambda`` stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossName = Literal["cross_entropy", "bce", "center"]


class CenterLoss(nn.Module):
    """Center loss (Wen et al., 2016): ``1/2 * mean_i ||f_i - c_{y_i}||^2``.

    One learnable centre per class in the feature space; the centres are parameters of the model,
    so the optimizer moves them towards their class's features and checkpoints keep them.
    """

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feature_dim))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        diff = features.float() - self.centers[targets]
        return 0.5 * diff.pow(2).sum(dim=1).mean()


@dataclass(frozen=True)
class Criterion:
    """The training loss; ``center`` is cross-entropy plus ``center_lambda`` times center loss."""

    name: LossName
    center_lambda: float = 0.0

    @property
    def multilabel(self) -> bool:
        return self.name == "bce"

    def __call__(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        targets: torch.Tensor,
        centers: CenterLoss | None,
    ) -> torch.Tensor:
        loss = self.eval_loss(logits, targets)
        if self.name == "center":
            if centers is None:
                raise ValueError("center loss needs a model built with center_loss=True")
            loss = loss + self.center_lambda * centers(features, targets)
        return loss

    def eval_loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The classification term: cross-entropy, or BCE with logits averaged over labels."""
        if self.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").mean(dim=1)
        else:
            loss = F.cross_entropy(logits.float(), targets, reduction="none")
        return loss.sum() if reduction == "sum" else loss.mean()
