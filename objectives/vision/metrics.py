"""Classification metrics computed on the device, read back once per epoch.

Top-k accuracy for single-label tasks; label-wise accuracy and mean average precision (mAP, the
metric of report 001) for multi-label tasks. :func:`average_precision` is exact: it equals
scikit-learn's ``average_precision_score`` per class, ties in the scores included.

The multi-label metrics take an optional ``ignore`` mask (bool ``(N, K)``, VOC's ``difficult``
labels, ``ImageData.*_ignore``): an ignored ``(n, k)`` pair counts neither as right nor as wrong
in the label-wise accuracy, and is neither a positive nor a negative of class ``k`` in its AP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have their target among the ``k`` highest logits (a 0-d tensor, no sync)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1).sum()


def multilabel_correct(
    logits: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """How many (sample, label) pairs are right when a logit above 0 (p > 0.5) predicts the label.

    Pairs flagged in ``ignore`` (bool, the shape of ``targets``) are left out: count the rest with
    :func:`counted_labels`."""
    right = (logits > 0) == (targets > 0.5)
    if ignore is not None:
        right = right & ~ignore
    return right.sum()


def counted_labels(targets: torch.Tensor, ignore: torch.Tensor | None = None) -> int | torch.Tensor:
    """How many (sample, label) pairs :func:`multilabel_correct` counts: an int without ``ignore``,
    else a 0-d tensor on its device (no host sync; :meth:`EpochMeter.add` takes either)."""
    if ignore is None:
        return targets.numel()
    return (~ignore).sum()


def average_precision(
    scores: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Average precision of each column of ``scores`` (N, K) against 0/1 ``targets`` (N, K).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds, as scikit-learn defines
    it; a class without any positive gets NaN. Computed in float64 on the scores' device.
    ``ignore`` (bool (N, K)): pairs left out of their column, as if the sample were not there for
    that class (they take no rank and are no hit): column ``k`` equals scikit-learn's AP on
    ``~ignore[:, k]``'s rows.
    """
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets[:, None]
        ignore = ignore[:, None] if ignore is not None else None
    scores = scores.double()
    sorted_scores, order = scores.sort(dim=0, descending=True, stable=True)
    hits = targets.double().gather(0, order)
    if ignore is None:
        ranks = torch.arange(1, len(scores) + 1, device=scores.device, dtype=torch.float64)[:, None]
    else:
        # An ignored pair is no hit and takes no rank: the ranks count the kept pairs only. (Where
        # it sits in a tie group does not matter: a group's precision is taken at its end.)
        kept = (~ignore).double().gather(0, order)
        hits = hits * kept
        ranks = kept.cumsum(dim=0).clamp(min=1.0)  # 0 only before the first kept pair (no hit yet)
    tps = hits.cumsum(dim=0)
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


def mean_average_precision(
    scores: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean of :func:`average_precision` over the classes that have at least one (counted) positive."""
    return average_precision(scores, targets, ignore).nanmean()


class EpochMeter:
    """Sums of per-batch statistics kept as device tensors; :meth:`compute` syncs once.

    :meth:`add` never reads a value back (counts are Python ints the loop knows, or 0-d device
    tensors where only the device knows them, e.g. the labels left after VOC's ``difficult`` ones;
    totals stay on the device), so an epoch on CUDA queues its batches without waiting for any of
    them; the epoch's one host sync is :meth:`compute`'s, exempt from
    ``torch.cuda.set_sync_debug_mode`` (the GPU tests run epochs with it set to ``"error"``)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._device_counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: torch.Tensor, count: int | torch.Tensor) -> None:
        """Add ``total`` (a 0-d tensor: a sum over ``count`` items) to the running mean ``name``."""
        total = total.detach().double()
        self._sums[name] = self._sums[name] + total if name in self._sums else total
        if isinstance(count, torch.Tensor):
            count = count.detach().double()
            known = self._device_counts.get(name)
            self._device_counts[name] = known + count if known is not None else count
            self._counts.setdefault(name, 0)
        else:
            self._counts[name] = self._counts.get(name, 0) + count

    def compute(self) -> dict[str, float]:
        names = list(self._sums)
        if not names:
            return {}
        counted = list(self._device_counts)
        stacked = torch.stack([self._sums[n] for n in names] + [self._device_counts[n] for n in counted])
        with intended_sync(stacked.device):
            values = stacked.tolist()  # the one host sync
        counts: dict[str, float] = {n: float(self._counts[n]) for n in names}
        for n, c in zip(counted, values[len(names) :], strict=True):
            counts[n] += c
        return {n: v / max(counts[n], 1.0) for n, v in zip(names, values[: len(names)], strict=True)}


@contextlib.contextmanager
def intended_sync(device: torch.device) -> Iterator[None]:
    """Allow a host sync on ``device`` that the code means to make, under any sync debug mode."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
