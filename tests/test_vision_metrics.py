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


def test_bce_loss_averages_over_labels() -> None:
    logits = torch.randn(4, 20)
    targets = (torch.rand(4, 20) < 0.3).float()
    criterion = Criterion("bce")
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert float(criterion(logits, logits, targets, None)) == pytest.approx(float(expected), rel=1e-6)
    assert float(criterion.eval_loss(logits, targets, reduction="sum")) == pytest.approx(float(expected) * 4)
