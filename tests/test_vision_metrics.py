"""Device-side metrics and losses of the image-classification objective against reference code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, top_k_accuracy_score

from objectives.vision.losses import CenterLoss, Criterion
from objectives.vision.metrics import (
    EpochMeter,
    average_precision,
    counted_labels,
    mean_average_precision,
    multilabel_correct,
    topk_correct,
)


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_equals_scikit_learn_per_class(ties: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    n, k = 97, 20  # VOC's 20 classes
    scores = torch.randn(n, k, generator=generator)
    if ties:  # few distinct scores: many tied thresholds
        scores = torch.randint(0, 4, (n, k), generator=generator).float()
    targets = (torch.rand(n, k, generator=generator) < 0.25).float()
    targets[0] = 1.0  # every class has a positive
    ours = average_precision(scores, targets).numpy()
    reference = [average_precision_score(targets[:, j].numpy(), scores[:, j].numpy()) for j in range(k)]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    macro = average_precision_score(targets.numpy(), scores.numpy(), average="macro")
    assert float(mean_average_precision(scores, targets)) == pytest.approx(macro, abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_ignored_pairs_leave_average_precision_as_scikit_learn_without_them(ties: bool) -> None:
    """VOC's difficult labels: an ignored (n, k) pair is neither a positive nor a negative of class
    k, so column k's AP is scikit-learn's on the rows not ignored there (ignored positives too)."""
    generator = torch.Generator().manual_seed(5)
    n, k = 83, 12
    scores = torch.randn(n, k, generator=generator)
    if ties:  # few distinct scores: ignored pairs sit inside tie groups, also at their ends
        scores = torch.randint(0, 3, (n, k), generator=generator).float()
    targets = (torch.rand(n, k, generator=generator) < 0.3).float()
    ignore = torch.rand(n, k, generator=generator) < 0.3
    ignore[:2] = False
    targets[0] = 1.0  # every class keeps a positive and a negative
    targets[1] = 0.0
    ignore[:, 0] = True  # a class whose every pair is ignored has no AP
    ours = average_precision(scores, targets, ignore)
    assert math.isnan(float(ours[0]))
    reference = []
    for j in range(1, k):
        keep = ~ignore[:, j]
        reference.append(average_precision_score(targets[keep, j].numpy(), scores[keep, j].numpy()))
    np.testing.assert_allclose(ours[1:].numpy(), reference, rtol=0, atol=1e-12)
    assert float(mean_average_precision(scores, targets, ignore)) == pytest.approx(
        float(np.mean(reference)), abs=1e-12
    )
    # No flag set is the same as no mask; a 1-d column takes a 1-d mask.
    none = torch.zeros_like(ignore)
    assert torch.equal(average_precision(scores, targets, none), average_precision(scores, targets))
    column = average_precision(scores[:, 3], targets[:, 3], ignore[:, 3])
    assert float(column[0]) == pytest.approx(reference[2], abs=1e-12)


def test_ignored_pairs_count_neither_right_nor_wrong() -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0], [-3.0, 0.5, 1.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # right: (0,0) (1,0) (1,1) (1,2)
    ignore = torch.tensor([[False, True, True], [True, False, False]])
    assert int(multilabel_correct(logits, targets)) == 4
    assert int(multilabel_correct(logits, targets, ignore)) == 3  # (0,0) (1,1) (1,2)
    assert counted_labels(targets) == 6
    assert int(counted_labels(targets, ignore)) == 3


def test_epoch_meter_takes_counts_kept_on_the_device() -> None:
    meter = EpochMeter()
    meter.add("acc", torch.tensor(3), torch.tensor(4))
    meter.add("acc", torch.tensor(2), 2)
    meter.add("acc", torch.tensor(1), torch.tensor(2))
    meter.add("loss", torch.tensor(5.0), 2)
    assert meter.compute() == {"acc": 0.75, "loss": 2.5}


def test_map_ignores_classes_without_positives() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.6, 0.7, 0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    ap = average_precision(scores, targets)
    assert math.isnan(float(ap[2]))
    expected = np.mean([average_precision_score(targets[:, j], scores[:, j]) for j in (0, 1)])
    assert float(mean_average_precision(scores, targets)) == pytest.approx(expected)


def test_topk_and_multilabel_counts_match_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 12, generator=generator)
    targets = torch.randint(0, 12, (64,), generator=generator)
    for k in (1, 5):
        expected = top_k_accuracy_score(targets.numpy(), logits.numpy(), k=k, labels=list(range(12)))
        assert int(topk_correct(logits, targets, k)) == round(expected * 64)
    multi_targets = (torch.rand(64, 12, generator=generator) < 0.5).float()
    expected_correct = ((torch.sigmoid(logits) > 0.5).float() == multi_targets).sum()
    assert int(multilabel_correct(logits, multi_targets)) == int(expected_correct)


def test_epoch_meter_means() -> None:
    meter = EpochMeter()
    meter.add("loss", torch.tensor(6.0), 3)
    meter.add("loss", torch.tensor(4.0), 1)
    meter.add("acc", torch.tensor(2), 4)
    assert meter.compute() == {"loss": 2.5, "acc": 0.5}


@torch.no_grad()
def test_center_loss_is_half_mean_squared_distance_to_class_centre() -> None:
    torch.manual_seed(0)
    centers = CenterLoss(num_classes=3, feature_dim=4).eval()  # eval: no centre initialisation/update
    centers.centers.copy_(torch.randn(3, 4))
    features = torch.randn(5, 4)
    targets = torch.tensor([0, 2, 1, 2, 0])
    expected = (
        0.5 * torch.stack([((features[i] - centers.centers[targets[i]]) ** 2).sum() for i in range(5)]).mean()
    )
    assert float(centers(features, targets)) == pytest.approx(float(expected))
    logits = torch.randn(5, 3)
    criterion = Criterion("center", center_lambda=0.3)
    total = criterion(logits, features, targets, centers)
    assert float(total) == pytest.approx(float(F.cross_entropy(logits, targets) + 0.3 * expected), rel=1e-6)
    # Validation loss is the classification term alone, comparable across lambdas.
    assert float(criterion.eval_loss(logits, targets)) == pytest.approx(
        float(F.cross_entropy(logits, targets))
    )


def test_bce_loss_leaves_ignored_pairs_out() -> None:
    """The BCE with ignore flags is the mean over the other pairs; flagged pairs get no gradient,
    so their targets do not matter."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=generator, requires_grad=True)
    targets = (torch.rand(6, 5, generator=generator) < 0.4).float()
    ignore = torch.rand(6, 5, generator=generator) < 0.3
    criterion = Criterion("bce")
    expected = F.binary_cross_entropy_with_logits(logits[~ignore], targets[~ignore]).detach()
    loss = criterion(logits, logits, targets, None, ignore=ignore)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    grad = logits.grad
    assert grad is not None and torch.all(grad[ignore] == 0) and torch.all(grad[~ignore] != 0)
    logits = logits.detach()
    flipped = torch.where(ignore, 1.0 - targets, targets)
    assert torch.equal(
        criterion.eval_loss(logits, flipped, ignore=ignore),
        criterion.eval_loss(logits, targets, ignore=ignore),
    )
    summed = criterion.eval_loss(logits, targets, reduction="sum", ignore=ignore)
    assert float(summed) == pytest.approx(float(expected) * 6, rel=1e-6)
    no_flags = criterion.eval_loss(logits, targets, ignore=torch.zeros_like(ignore))
    assert float(no_flags) == pytest.approx(float(criterion.eval_loss(logits, targets)), rel=1e-6)
    with pytest.raises(ValueError, match="multi-label"):
        Criterion("cross_entropy").eval_loss(logits, targets.argmax(1), ignore=ignore)


def test_center_loss_counts_each_class_in_the_batch() -> None:
    centers = CenterLoss(num_classes=4, feature_dim=2)
    features = torch.arange(10.0).view(5, 2)
    targets = torch.tensor([2, 0, 2, 2, 1])
    sums, counts = centers._class_sums(features, targets)
    assert counts.tolist() == [1.0, 1.0, 3.0, 0.0] and counts.dtype == sums.dtype
    assert torch.equal(sums[2], features[[0, 2, 3]].sum(0))


def test_bce_loss_averages_over_labels() -> None:
    logits = torch.randn(4, 20)
    targets = (torch.rand(4, 20) < 0.3).float()
    criterion = Criterion("bce")
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert float(criterion(logits, logits, targets, None)) == pytest.approx(float(expected), rel=1e-6)
    assert float(criterion.eval_loss(logits, targets, reduction="sum")) == pytest.approx(float(expected) * 4)
