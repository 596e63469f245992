"""Classification metrics computed on the device, read back once per epoch.

Top-k accuracy for single-label tasks; label-wise accuracy and mean average precision (mAP, the
metric of report 001) for multi-label tasks. :func:`average_precision` is exact: it equals
scikit-learn's ``average_precision_score`` per class, ties in the scores included.
"""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have their target among the ``k`` highest logits (a 0-d tensor, no sync)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1).sum()


def multilabel_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many (sample, label) pairs are right when a logit above 0 (p > 0.5) predicts the label."""
    return ((logits > 0) == (targets > 0.5)).sum()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average precision of each column of ``scores`` (N, K) against 0/1 ``targets`` (N, K).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, as scikit-learn defines
    it; a class without any positive gets NaN. Computed in float64 on the scores' device.
    """
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets[:, None]
    scores = scores.double()
    sorted_scores, order = scores.sort(dim=0, descending=True, stable=True)
    hits = targets.double().gather(0, order)
    tps = hits.cumsum(dim=0)
    ranks = torch.arange(1, len(scores) + 1, device=scores.device, dtype=torch.float64)[:, None]
    precision = tps / ranks
    # Tied scores form one threshold: every sample of a tie group gets the precision at its end.
    is_last = torch.ones_like(hits, dtype=torch.bool)
    is_last[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    is_first = torch.ones_like(is_last)
    is_first[1:] = is_last[:-1]
    group = is_first.long().cumsum(dim=0) - 1
    group_precision = torch.zeros_like(precision).scatter_reduce(
        0, group, precision * is_last, reduce="amax", include_self=True
    )
    positives = hits.sum(dim=0)
    ap = (hits * group_precision.gather(0, group)).sum(dim=0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean of :func:`average_precision` over the classes that have at least one positive."""
    return average_precision(scores, targets).nanmean()


class EpochMeter:
    """Sums of per-batch statistics kept as device tensors; :meth:`compute` syncs once."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, total: torch.Tensor, count: int) -> None:
        """Add ``total`` (a 0-d tensor: a sum over ``count`` items) to the running mean ``name``."""
        total = total.detach().double()
        self._sums[name] = self._sums[name] + total if name in self._sums else total
        self._counts[name] = self._counts.get(name, 0) + count

    def compute(self) -> dict[str, float]:
        names = list(self._sums)
        if not names:
            return {}
        values = torch.stack([self._sums[n] for n in names]).tolist()  # the one host sync
        return {n: v / max(self._counts[n], 1) for n, v in zip(names, values, strict=True)}
