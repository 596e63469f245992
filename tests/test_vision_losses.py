"""Report 003's losses: center loss with its own centre update (Wen et al., 2016) and batch-hard
triplet loss (Hermans et al., 2017), on small tensors (CPU)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from objectives.vision.losses import CenterLoss, Criterion, batch_hard_triplet_loss


def _separable(n_per_class: int = 40, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """2-d inputs of three linearly separable classes: a cluster per class around well-separated points."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return means[y] + noise * torch.randn(len(y), 2, generator=g), y


def _train_toy(
    center_lambda: float, steps: int = 600
) -> tuple[list[float], CenterLoss, torch.Tensor, torch.Tensor]:
    """Cross-entropy + lambda x center loss on 4-d features of the toy data; (center terms, centres,
    features of all samples after training, targets)."""
    torch.manual_seed(0)
    x, y = _separable()
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))  # 4-d features
    with torch.no_grad():  # start with widely spread features, so that there is something to pull in
        for p in net.parameters():
            p.mul_(3.0)
    head = nn.Linear(4, 3)
    centres = CenterLoss(3, 4, alpha=0.5)
    optimizer = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.01)
    g = torch.Generator().manual_seed(1)
    terms = []
    for _ in range(steps):
        batch = torch.randperm(len(y), generator=g)[:24]
        features = net(x[batch])
        term = centres(features, y[batch])  # on the current centres, which it then updates
        terms.append(float(term.detach()))
        loss = torch.nn.functional.cross_entropy(head(features), y[batch]) + center_lambda * term
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return terms, centres, net(x), y


def test_center_loss_decreases_and_centres_converge_to_the_class_means() -> None:
    terms, centres, features, y = _train_toy(center_lambda=1.0)
    # The centres are buffers, not parameters: no optimizer can move them; checkpoints keep them.
    assert list(centres.parameters()) == []
    assert set(centres.state_dict()) == {"centers", "initialized"}
    assert bool(centres.initialized.all())
    # The center term falls: each class's features contract around its centre ...
    first, last = sum(terms[:20]) / 20, sum(terms[-20:]) / 20
    assert last < 0.2 * first
    # ... which cross-entropy alone does not do (it spreads the features out here).
    terms_ce, _, _, _ = _train_toy(center_lambda=0.0)
    assert sum(terms_ce[-20:]) / 20 > 5 * last
    # The centres are where the classes are: close to each class's mean feature (they trail the
    # moving features by a few steps), far closer than the classes are to each other.
    means = torch.stack([features[y == k].mean(0) for k in range(3)])
    spread = (features - means[y]).norm(dim=1).mean()
    error = (centres.centers - means).norm(dim=1).max()
    assert error < 0.5 * spread
    assert torch.pdist(means).min() > 4 * error


def test_centres_converge_to_the_class_means_of_fixed_features() -> None:
    x, y = _separable(noise=0.5)
    features = torch.cat([x, x.pow(2)], dim=1)  # fixed 4-d features
    means = torch.stack([features[y == k].mean(0) for k in range(3)])
    centres = CenterLoss(3, 4, alpha=0.5)
    g = torch.Generator().manual_seed(2)
    for step in range(400):
        batch = torch.randperm(len(y), generator=g)[:60] if step < 300 else torch.arange(len(y))
        centres(features[batch], y[batch])
    # Full batches at the end: each step moves c by alpha * n/(1+n) of the way to the class mean.
    assert torch.allclose(centres.centers, means, atol=1e-4)


def test_centre_update_is_wen_et_al_and_independent_of_lambda() -> None:
    centres = CenterLoss(3, 2, alpha=0.5)
    f0 = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    y0 = torch.tensor([0, 0, 1])
    centres(f0, y0)
    # First batch containing a class: its centre is the class's batch mean (then the update is 0).
    assert torch.allclose(centres.centers[0], torch.tensor([2.0, 1.0]))
    assert torch.allclose(centres.centers[1], torch.tensor([0.0, 5.0]))
    assert centres.initialized.tolist() == [True, True, False]
    assert torch.equal(centres.centers[2], torch.zeros(2))  # class 2 not seen yet

    before = centres.centers.clone()
    f1 = torch.tensor([[4.0, 3.0], [6.0, 3.0], [1.0, 1.0]])
    y1 = torch.tensor([0, 0, 2])
    loss = centres(f1, y1)
    # The loss uses the centres as they were before this batch's update.
    expected_loss = 0.5 * ((f1[:2] - before[0]).pow(2).sum(1).sum() + 0) / 3
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    # c0 <- c0 - alpha * sum_i (c0 - f_i) / (1 + n0)
    delta = (2 * before[0] - f1[:2].sum(0)) / 3
    assert torch.allclose(centres.centers[0], before[0] - 0.5 * delta)
    assert torch.equal(centres.centers[1], before[1])  # absent from the batch: unchanged
    assert torch.allclose(centres.centers[2], torch.tensor([1.0, 1.0]))  # first seen: its mean

    # lambda only weighs the loss: the centres move the same with lambda 0.1 and 10.
    moved = []
    for lam in (0.1, 10.0):
        c = CenterLoss(3, 2, alpha=0.5)
        Criterion("center", center_lambda=lam)(torch.zeros(3, 3), f0, y0, c)
        Criterion("center", center_lambda=lam)(torch.zeros(3, 3), f1, y1, c)
        moved.append(c.centers.clone())
    assert torch.equal(moved[0], moved[1])

    # Evaluation mode computes the loss and leaves the centres alone.
    centres.eval()
    frozen = centres.centers.clone()
    centres(f1 + 10, y1)
    assert torch.equal(centres.centers, frozen)


def _brute_force_batch_hard(x: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """Loop over every anchor, positive and negative (float64)."""
    losses = []
    for a in range(len(y)):
        positives = [p for p in range(len(y)) if p != a and y[p] == y[a]]
        negatives = [n for n in range(len(y)) if y[n] != y[a]]
        if not positives or not negatives:
            continue  # no triplet with this anchor
        hardest = max(
            (
                float((x[a] - x[p]).norm()) - float((x[a] - x[n]).norm())
                for p, n in itertools.product(positives, negatives)
            )
        )
        losses.append(max(0.0, margin + hardest))
    return torch.tensor(sum(losses) / len(losses) if losses else 0.0, dtype=torch.float64)


@pytest.mark.parametrize(
    "labels",
    [
        [0, 0, 1, 1, 2, 2],
        [0, 0, 0, 1, 2, 2, 3],  # classes 1 and 3 have a single sample: no positive for them
        [0, 1, 2, 3],  # nobody has a positive: no triplet at all
        [5, 5, 5],  # one class: no negatives
        [0, 1, 1, 1, 1, 2, 2, 0, 3],
    ],
)
@pytest.mark.parametrize("margin", [0.2, 1.0, 5.0])
def test_batch_hard_triplet_loss_matches_brute_force(labels: list[int], margin: float) -> None:
    g = torch.Generator().manual_seed(len(labels))
    x = torch.randn(len(labels), 5, generator=g, dtype=torch.float64)
    y = torch.tensor(labels)
    expected = _brute_force_batch_hard(x, y, margin)
    got = batch_hard_triplet_loss(x, y, margin)
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_triplet_gradient_is_finite_with_identical_embeddings() -> None:
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    loss = batch_hard_triplet_loss(x, y, 0.2)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(loss.detach()) > 0  # anchor 0's negative (sample 2) is at distance 0: the hinge is active
    # No triplet in the batch: zero, with a zero gradient.
    z = torch.randn(3, 2, requires_grad=True)
    empty = batch_hard_triplet_loss(z, torch.tensor([0, 1, 2]), 0.2)
    empty.backward()
    assert float(empty.detach()) == 0.0 and z.grad is not None and torch.equal(z.grad, torch.zeros(3, 2))


def test_triplet_criterion_is_read_out_cross_entropy_plus_batch_hard() -> None:
    g = torch.Generator().manual_seed(3)
    logits, features = torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    criterion = Criterion("triplet", triplet_margin=0.5)
    expected = torch.nn.functional.cross_entropy(logits, y) + batch_hard_triplet_loss(features, y, 0.5)
    assert torch.allclose(criterion(logits, features, y, None), expected)
    assert torch.allclose(criterion.eval_loss(logits, y), torch.nn.functional.cross_entropy(logits, y))
