"""Seeded stratified selection that keeps every class (private to :mod:`objectives.vision`).

scikit-learn's ``train_test_split(stratify=...)`` allocates samples per class by rounding, so at
``subset: 0.1`` a class with fewer than ~5 images can get none, and it refuses classes with a
single image outright. The issue requires every class to survive the subset (Caltech101 has
classes of 31 and of 800 images), so the allocation here is sklearn's largest-remainder rule with
a floor of one sample per stratum:

* ``sample``: a ``fraction`` of every stratum, at least one from each.
* ``split``: a validation share of every stratum with two or more samples, at least one and
  never all of them, so each class keeps at least one training sample.

Strata are the class index for multiclass targets. For multilabel targets each sample's stratum
is its *rarest* positive label (rarest over the whole pool; samples without labels form one more
stratum), so rare labels are sampled proportionally; afterwards any label that has positives in
the pool but none in the selection gets one positive sample added (for ``split``: moved into
the training part first, then into the validation part when that leaves training covered).
All randomness comes from the ``numpy.random.Generator`` passed in, so a seed fixes the result.
"""

from __future__ import annotations

import numpy as np


def strata(targets: np.ndarray) -> np.ndarray:
    """Stratum per sample: the class for (N,) targets, the rarest positive label for (N, K) ones."""
    if targets.ndim == 1:
        return targets.astype(np.int64, copy=False)
    positive = targets > 0
    frequency = positive.sum(axis=0).astype(np.float64)
    rarity = np.where(positive, frequency[None, :], np.inf)
    keys = rarity.argmin(axis=1).astype(np.int64)  # ties: lowest label index, deterministic
    keys[~positive.any(axis=1)] = targets.shape[1]
    return keys


def _groups(keys: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Counts per stratum and the (ascending) member positions of each stratum."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    return counts, np.split(order, np.cumsum(counts)[:-1])


def _allocate(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Largest-remainder allocation of ``round(fraction * total)`` over strata (ties at random)."""
    exact = counts * fraction
    take = np.floor(exact).astype(np.int64)
    remainder = int(np.floor(exact.sum() + 0.5)) - int(take.sum())
    if remainder > 0:
        shuffled = rng.permutation(len(counts))
        ranked = shuffled[np.argsort(-(exact - take)[shuffled], kind="stable")]
        take[ranked[:remainder]] += 1
    return np.minimum(take, counts)


def sample(targets: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a stratified ``fraction`` of ``targets``, every class kept."""
    if fraction >= 1.0 or len(targets) == 0:
        return np.arange(len(targets))
    counts, members = _groups(strata(targets))
    take = np.clip(_allocate(counts, fraction, rng), 1, counts)
    chosen = np.zeros(len(targets), dtype=bool)
    for group, n in zip(members, take, strict=True):
        chosen[rng.permutation(group)[:n]] = True
    if targets.ndim == 2:
        _add_missing_labels(chosen, targets, rng)
    return np.flatnonzero(chosen)


def split(
    targets: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) positions: a stratified ``val_fraction`` of every class goes to val.

    A class with a single sample stays in train; every other class has samples on both sides.
    """
    counts, members = _groups(strata(targets))
    n_val = np.where(counts >= 2, np.clip(_allocate(counts, val_fraction, rng), 1, counts - 1), 0)
    is_val = np.zeros(len(targets), dtype=bool)
    for group, n in zip(members, n_val, strict=True):
        is_val[rng.permutation(group)[:n]] = True
    if targets.ndim == 2:
        _balance_labels(is_val, targets > 0, rng)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _add_missing_labels(chosen: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> None:
    """Add one positive sample for each label that has positives but none among ``chosen``."""
    positive = targets > 0
    for label in np.argsort(positive.sum(axis=0), kind="stable"):  # rarest first
        if positive[:, label].any() and not positive[chosen, label].any():
            chosen[rng.choice(np.flatnonzero(positive[:, label]))] = True


def _balance_labels(is_val: np.ndarray, positive: np.ndarray, rng: np.random.Generator) -> None:
    """Train must see every label; validation should see every label with two or more positives."""
    for label in np.argsort(positive.sum(axis=0), kind="stable"):
        if positive[:, label].any() and not positive[~is_val, label].any():
            is_val[rng.choice(np.flatnonzero(positive[:, label] & is_val))] = False
    for label in np.argsort(positive.sum(axis=0), kind="stable"):
        if positive[:, label].sum() < 2 or positive[is_val, label].any():
            continue
        train_counts = positive[~is_val].sum(axis=0)
        # Move only a sample whose labels all stay present in train without it.
        movable = positive[:, label] & ~is_val & ~(positive & (train_counts < 2)[None, :]).any(axis=1)
        if movable.any():
            is_val[rng.choice(np.flatnonzero(movable))] = True
