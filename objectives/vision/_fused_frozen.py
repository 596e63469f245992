"""Fused trials with a frozen backbone (``transfer: features``): the frozen part runs once per group.

Members of a fused group share their data, seed, model and pretrained weights, so their frozen
prefix (AlexNet/VGG's convolutional part, a whole ResNet/EfficientNet, ``resnet18_mlp``'s encoder:
:func:`objectives.vision.features.frozen_split`) is the same function for all of them. Only the
trainable rest (a :class:`~objectives.vision.features.CachedHead` of each member's model, sharing
its parameters) trains per member (each member's own in turn, or report 000's MLP batched:
:mod:`objectives.vision._fused_mlp`); the prefix is not run K times:

* **cached**: when the unfused trial would use the frozen-feature cache (no augmentation, a
  deterministic prefix, ``feature_cache: auto`` for every member) the group trains on the cached
  features, computed once per worker and dataset by the very code the unfused trial runs
  (:func:`~objectives.vision.features.use_feature_cache`, same cache entry);
* **per batch**: otherwise (augmentation, batch norm adapting in ``frozen_mode: train``, stochastic
  depth) the prefix runs once per batch on the shared augmented batch, without gradients, and its
  output feeds every member. Its random draws (stochastic depth) are each unfused run's draws: the
  same RNG state, consumed once in the same order (prefix, then the rest's dropout).

A prefix with state that changes while training (batch-norm running statistics in ``frozen_mode:
train``) can differ between members that joined the group from different checkpoints; members are
grouped by equal prefix state at the start of every epoch, each distinct prefix runs from the same
RNG state, and the members whose prefix equalled it get its updated statistics at the epoch's end.
The held-out test images (``test_metrics``) always run through the prefix, as the unfused trial
evaluates its whole model on them.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpo._fused import Member
from objectives.vision._inputs import Inputs
from objectives.vision.augment import Augmentation
from objectives.vision.features import CachedHead, frozen_split, use_feature_cache


def same_state(left: nn.Module, right: nn.Module) -> bool:
    """Whether two modules of one architecture hold equal parameters and buffers (bit for bit)."""
    a, b = left.state_dict(), right.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _same_buffers(left: nn.Module, right: nn.Module) -> bool:
    a, b = dict(left.named_buffers()), dict(right.named_buffers())
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _weights_ids(prefixes: Sequence[nn.Module]) -> list[int]:
    """For each prefix, the index of the first one with equal parameters (frozen: compared once)."""
    ids: list[int] = []
    for k, prefix in enumerate(prefixes):
        params = list(prefix.parameters())
        same = (
            j
            for j in sorted(set(ids))
            if all(torch.equal(a, b) for a, b in zip(params, prefixes[j].parameters(), strict=True))
        )
        ids.append(next(same, k))
    return ids


@dataclass
class FrozenPrefix:
    """The members' frozen prefixes, run once for the group; see the module docstring.

    ``prefix_of`` maps each member's trained module (``Member.net``) to its own frozen prefix;
    ``cached``: the inputs are the prefix's cached features (nothing to run per batch).
    """

    prefix_of: dict[int, nn.Module]
    cached: bool
    # Which prefixes hold equal (frozen) parameters: by id(prefix), compared once.
    _weights: dict[int, int] = field(default_factory=dict)
    # Per epoch: the index of the member whose prefix runs for each member (itself or an earlier one).
    _owner: list[int] = field(default_factory=list)
    _prefixes: list[nn.Module] = field(default_factory=list)

    def __post_init__(self) -> None:
        prefixes = list(self.prefix_of.values())
        self._weights = {id(p): i for p, i in zip(prefixes, _weights_ids(prefixes), strict=True)}

    def begin(self, nets: Sequence[nn.Module]) -> None:
        """Group the active members (the stack's modules, in order) by equal prefix state: the
        same frozen parameters and, compared every epoch, the same buffers (batch-norm statistics)."""
        self._prefixes = [self.prefix_of[id(net)] for net in nets]
        self._owner = []
        for k, prefix in enumerate(self._prefixes):
            same = (j for j in sorted(set(self._owner)) if self._same_state(self._prefixes[j], prefix))
            self._owner.append(next(same, k))

    def _same_state(self, left: nn.Module, right: nn.Module) -> bool:
        return self._weights[id(left)] == self._weights[id(right)] and _same_buffers(left, right)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The prefix's output for the input batch ``x``: (B, ...) shared by every member, or
        (K, B, ...) one per member where their prefixes differ (``True``: per member)."""
        owners = sorted(set(self._owner))
        if len(owners) == 1:
            return self._prefixes[owners[0]](x), False
        rng = torch.get_rng_state()  # each distinct prefix draws what its unfused run draws
        out = {}
        for j in owners:
            torch.set_rng_state(rng)
            out[j] = self._prefixes[j](x)
        return torch.stack([out[j] for j in self._owner]), True

    @torch.no_grad()
    def end(self) -> None:
        """Give each member its owner's updated prefix buffers (batch-norm statistics)."""
        for k, j in enumerate(self._owner):
            if j != k:
                mine, theirs = self._prefixes[k].buffers(), self._prefixes[j].buffers()
                for buffer, updated in zip(mine, theirs, strict=True):
                    buffer.copy_(updated)


def share_frozen_prefix(
    members: Sequence[Member],
    inputs: Inputs,
    *,
    feature_cache: bool,
    augmentation: Augmentation | None,
    cache: MutableMapping[str, Any],
    data_key: str,
    batch_size: int,
    device: torch.device,
) -> tuple[Inputs, FrozenPrefix]:
    """Set each member's ``net`` to the trainable rest of its model and say how the prefix runs:
    on cached features (the returned inputs are then the features) or once per batch.
    ``feature_cache``: every member allows the cache (``feature_cache: auto``)."""
    from objectives.vision.models import ImageClassifier

    prefix_of: dict[int, nn.Module] = {}
    for member in members:
        model = member.model
        split = frozen_split(model) if isinstance(model, ImageClassifier) else None
        if split is None or not isinstance(model, ImageClassifier):
            raise ValueError("a fused transfer: features member has no frozen prefix to share")
        member.net = CachedHead(model, split.rest)
        prefix_of[id(member.net)] = split.prefix
    prefixes = list(prefix_of.values())
    cached = False
    if feature_cache and all(same_state(prefixes[0], p) for p in prefixes[1:]):
        first = members[0].model
        if not isinstance(first, ImageClassifier):
            raise TypeError("a fused image_classifier member is an ImageClassifier")
        net, features = use_feature_cache(
            "auto",
            first,
            inputs,
            augmentation=augmentation,
            cache=cache,
            data_key=data_key,
            batch_size=batch_size,
            device=device,
            bf16=False,  # bf16 is refused for fused trials
        )
        cached = net is not first  # a CachedHead: the features are cached; else the reason was logged
        inputs = features
    return inputs, FrozenPrefix(prefix_of, cached)
