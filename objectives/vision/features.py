"""Frozen-feature cache: compute a frozen backbone's output once per worker, train only the head.

With ``transfer: features`` the frozen part of the model (AlexNet/VGG's convolutional part, a
whole ResNet/EfficientNet, report 000's ResNet-18 encoder) sees the same images every epoch and,
when it is deterministic, gives the same features every epoch: recomputing them is most of an
epoch's work. :func:`use_feature_cache` computes them once, keeps them in the worker's cache
(``TrialRun.cache``, next to the decoded images, on the device when they fit) and hands the loop a
:class:`CachedHead` (the trainable rest of the model, sharing its parameters) and inputs that are
those features. The next trial of the same worker with the same frozen weights and data reuses them.

The cache is exact only when the frozen prefix computes a fixed function of the image, so it is
used only when all of these hold, and otherwise the trial recomputes and one log line says why:

* no augmentation (an augmented image differs every epoch);
* nothing in the prefix trains (``requires_grad`` is off for all its parameters);
* in the mode the prefix runs in while training (``frozen_mode``), every layer is deterministic
  and per-sample: no active dropout or stochastic depth, no batch norm normalising with batch
  statistics (``frozen_mode: train`` with ResNet/EfficientNet: use ``frozen_mode: eval``), and no
  layer type this module does not know.

Features are computed in eval mode under the trial's autocast setting, in order, in batches of
``eval_batch_size``; the loop's batches then index them exactly as they indexed the images (same
seed, same order, same dropout masks in the trainable part), so curves equal recomputation within
floating-point tolerance (a convolution's result may depend in the last bits on its batch size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from hpo.launcher import device_memory_budget
from objectives.vision.augment import Augmentation, prepare_batch
from objectives.vision.models import ImageClassifier

logger = logging.getLogger(__name__)

FeatureCacheMode = Literal["auto", "off"]

# Features go to the GPU only when they take at most this share of its free memory (as images do).
_GPU_SHARE = 0.5
_KEY = "objectives.vision.features"
_SAID = "objectives.vision.features:said"

# Leaf layers that compute a fixed, per-sample function whatever their mode. Dropout, stochastic
# depth and batch norm are checked separately (their behaviour depends on the mode).
_DETERMINISTIC = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.ELU,
    nn.Identity,
    nn.Flatten,
    nn.LayerNorm,
    nn.GroupNorm,
)
# Containers whose own forward only composes their children (no functional dropout and the like).
_TRUSTED_PACKAGES = ("torch.nn.", "torchvision.", "objectives.vision.")


@dataclass(frozen=True)
class FrozenSplit:
    """``model.backbone`` as ``rest(prefix(x))``: ``prefix`` frozen, ``rest`` the backbone's remainder."""

    prefix: nn.Module
    rest: nn.Module


class CachedHead(ImageClassifier):
    """The trainable part of ``model`` on cached features: ``head(trunk(rest(features)))``.

    It is an :class:`ImageClassifier` (the loop's ``train_one_epoch`` and ``evaluate`` take one)
    whose backbone is ``rest``, sharing ``rest``, ``trunk``, ``head`` and the center-loss centres
    with ``model``: the optimizer (built on ``model``) and checkpoints (of ``model``) see the very
    same parameters. ``ImageClassifier.__init__`` is not called because it would build a new head.
    """

    def __init__(self, model: ImageClassifier, rest: nn.Module) -> None:
        nn.Module.__init__(self)
        self.backbone = rest
        self.trunk = model.trunk
        self.head = model.head
        self.feature_dim = model.feature_dim
        self.center_loss = model.center_loss
        self._frozen = ()  # the frozen prefix is not part of this module
        self.frozen_mode = model.frozen_mode


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def frozen_split(model: ImageClassifier) -> FrozenSplit | None:
    """The frozen prefix of ``model.backbone`` (``None`` when nothing before the trainable layers is frozen).

    A wholly frozen backbone (ResNet/EfficientNet or ``resnet18_mlp``'s encoder with ``transfer:
    features``) is the prefix; AlexNet/VGG with frozen ``features`` split where their ``forward``
    does: ``features``, ``avgpool``, ``flatten`` | ``classifier``.
    """
    backbone = model.backbone
    if _all_frozen(backbone):
        return FrozenSplit(backbone, nn.Identity())
    if isinstance(backbone, torchvision.models.AlexNet | torchvision.models.VGG) and _all_frozen(
        backbone.features
    ):
        prefix = nn.Sequential(backbone.features, backbone.avgpool, nn.Flatten(1))
        return FrozenSplit(prefix, backbone.classifier)
    return None


def nondeterminism(prefix: nn.Module) -> str | None:
    """Why ``prefix``, in its current train/eval modes, is not a fixed per-sample function (else None)."""
    for name, module in prefix.named_modules():
        where = f"{name or 'the frozen part'} ({type(module).__name__})"
        if isinstance(module, nn.modules.dropout._DropoutNd | StochasticDepth):
            if module.training and module.p > 0:
                return f"{where} drops units at random while training"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or not module.track_running_stats:
                return (
                    f"{where} normalises with batch statistics while training (features depend on the batch)"
                )
        elif any(True for _ in module.children()):
            if not type(module).__module__.startswith(_TRUSTED_PACKAGES):
                return f"{where} is a layer type whose forward the cache cannot check"
        elif not isinstance(module, _DETERMINISTIC):
            return f"{where} is a layer type the cache does not know to be deterministic"
    return None


def refusal(model: ImageClassifier, split: FrozenSplit, augmentation: Augmentation | None) -> str | None:
    """Why the features of ``split.prefix`` cannot be cached for this trial (None: they can)."""
    if augmentation is not None and augmentation.active:
        return (
            "augmentation changes the images every epoch, so their frozen features change too "
            "(augment: none enables the cache)"
        )
    was_training = model.training
    model.train()  # the modes the frozen part has while training (per frozen_mode)
    reason = nondeterminism(split.prefix)
    model.train(was_training)
    if reason is not None and model.frozen_mode == "train":
        reason += " (frozen_mode: train; frozen_mode: eval may enable the cache)"
    return reason


def weights_digest(module: nn.Module) -> str:
    """A digest of ``module``'s parameters and buffers (names, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Entry:
    key: str
    train: torch.Tensor
    val: torch.Tensor


@torch.no_grad()
def compute_features(
    prefix: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> torch.Tensor:
    """``prefix`` applied to uint8 ``images`` in order, batch by batch, as the training loop feeds it.

    Kept on ``device`` when it fits this slot's budget (CUDA; ``device_memory_budget``), else in CPU memory.
    """
    channels_last = device.type == "cuda"
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    out: torch.Tensor | None = None
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        x = prepare_batch(images[start:stop].to(device, non_blocking=True), None, None, channels_last)
        with autocast:
            features = prefix(x)
        if out is None:
            out = torch.empty(
                (len(images), *features.shape[1:]),
                dtype=features.dtype,
                device=_store(device, features, len(images)),
            )
        out[start:stop] = features
    if out is None:
        raise ValueError("no images to compute features of")
    return out


def _store(device: torch.device, sample: torch.Tensor, n: int) -> torch.device:
    if device.type != "cuda":
        return device
    needed = n * sample[0].numel() * sample.element_size()
    free, total = torch.cuda.mem_get_info(device)
    budget = device_memory_budget(free, total, _GPU_SHARE)
    if needed > budget:
        logger.warning(
            "frozen features take %.1f GiB, more than this slot's %.1f GiB of %s (see "
            "hpo.launcher.device_memory_budget): keeping them in CPU memory (batches are copied per step)",
            needed / 2**30,
            budget / 2**30,
            device,
        )
        return torch.device("cpu")
    return device


def _say_once(cache: MutableMapping[str, Any], message: str) -> None:
    said: set[str] = cache.setdefault(_SAID, set())
    if message not in said:
        said.add(message)
        logger.warning("%s", message)


class FeatureInputs(Protocol):
    """What the loop trains on (``train.Inputs``): images, or after caching, their features."""

    @property
    def train_x(self) -> torch.Tensor: ...
    @property
    def val_x(self) -> torch.Tensor: ...
    @property
    def images(self) -> bool: ...


InputsT = TypeVar("InputsT", bound=FeatureInputs)


def use_feature_cache(
    mode: FeatureCacheMode,
    model: ImageClassifier,
    inputs: InputsT,
    *,
    augmentation: Augmentation | None,
    cache: MutableMapping[str, Any],
    data_key: str,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> tuple[ImageClassifier, InputsT]:
    """The module to train and its inputs: a :class:`CachedHead` on features, or ``model`` on images.

    ``inputs`` is a dataclass (``train.Inputs``); with the cache, a copy whose ``train_x``/``val_x``
    are the features (``images=False``: the loop neither augments nor normalises them). ``data_key``
    names the dataset (configuration, seed, device); the features are stored under it in ``cache``
    with the prefix's structure, weights digest and precision, one entry per dataset: a trial with
    other frozen weights replaces it, so memory holds one set of features per dataset.
    """
    split = frozen_split(model) if mode == "auto" and inputs.images else None
    if split is None:  # off, or nothing frozen to cache: recompute, nothing to say
        return model, inputs
    reason = refusal(model, split, augmentation)
    if reason is not None:
        _say_once(cache, f"frozen-feature cache not used, features are recomputed every epoch: {reason}")
        return model, inputs
    model.eval()  # no state (e.g. BN statistics) may change while the features are computed
    key = f"{split.prefix!r}:{weights_digest(split.prefix)}:bf16={bf16}"
    slot = f"{_KEY}:{data_key}"
    entry: _Entry | None = cache.get(slot)
    if entry is None or entry.key != key:
        cache.pop(slot, None)  # free the old features before computing new ones
        train, val = (
            compute_features(split.prefix, x, batch_size=batch_size, device=device, bf16=bf16)
            for x in (inputs.train_x, inputs.val_x)
        )
        entry = _Entry(key, train, val)
        cache[slot] = entry
        logger.info("frozen features computed: train %s, val %s", tuple(train.shape), tuple(val.shape))
    features = dataclasses.replace(inputs, train_x=entry.train, val_x=entry.val, images=False)  # type: ignore[type-var]
    return CachedHead(model, split.rest), features
