"""Batched image augmentation and normalisation on the device holding the batch.

The presets are report 004's: ``flip_jitter`` (RandomHorizontalFlip + ColorJitter),
``flip_rotation`` (RandomHorizontalFlip + RandomRotation(30)) and ``flip_jitter_rotation`` (all
three). Unlike torchvision's per-image transforms, one call augments a whole uint8 batch where it
lies (GPU or CPU) with parameters drawn per image from the given generator, so an epoch's
augmentation is reproducible from its seed and needs no host round trip. The per-image operations
follow torchvision's definitions: a flip, brightness/contrast/saturation as blends with black, the
mean grey level and the greyscale image (``rgb_to_grayscale``), and a rotation about the centre
with zero fill (bilinear sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

AugmentPreset = Literal["none", "flip_jitter", "flip_rotation", "flip_jitter_rotation"]
# ImageNet statistics, what torchvision's pretrained models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Greyscale input (``data.channels: 1``): the mean of the three channels' statistics.
GREY_MEAN = (0.449,)
GREY_STD = (0.226,)


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations run; ``jitter`` is ColorJitter's brightness = contrast = saturation."""

    flip: bool = False
    jitter: float = 0.0
    rotation_degrees: float = 0.0

    @classmethod
    def preset(cls, name: AugmentPreset) -> Augmentation:
        flip = name != "none"
        jitter = 0.4 if "jitter" in name else 0.0
        rotation = 30.0 if "rotation" in name else 0.0  # report 004: RandomRotation(30)
        return cls(flip=flip, jitter=jitter, rotation_degrees=rotation)

    @property
    def active(self) -> bool:
        return self.flip or self.jitter > 0 or self.rotation_degrees > 0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment float images in [0, 1] of shape (N, C, H, W); parameters drawn per image."""
        if self.flip:
            images = random_flip(images, generator)
        if self.jitter > 0:
            images = color_jitter(images, self.jitter, generator)
        if self.rotation_degrees > 0:
            images = random_rotation(images, self.rotation_degrees, generator)
        return images


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=like.device, dtype=torch.float32)
    return (low + (high - low) * u).to(like.dtype).view(n, 1, 1, 1)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), TF.horizontal_flip(images), images)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors each drawn from [1 - s, 1 + s] per image."""
    n = len(images)
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    brightness, contrast, saturation = (_uniform(n, low, high, images, generator) for _ in range(3))
    return adjust_colors(images, brightness, contrast, saturation)


def adjust_colors(
    images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
) -> torch.Tensor:
    """torchvision's adjust_brightness, adjust_contrast and adjust_saturation (in this order) with
    one factor per image (``(N, 1, 1, 1)`` tensors) instead of one per call."""
    images = (images * brightness).clamp(0.0, 1.0)
    mean = TF.rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    images = (contrast * images + (1.0 - contrast) * mean).clamp(0.0, 1.0)
    gray = TF.rgb_to_grayscale(images)
    return (saturation * images + (1.0 - saturation) * gray).clamp(0.0, 1.0)


def random_rotation(images: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by an angle from [-degrees, degrees] about its centre, zero fill."""
    angles = _uniform(len(images), -degrees, degrees, images, generator).view(-1).float()
    return rotate(images, angles)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate image ``i`` by ``degrees[i]`` (counter-clockwise) about its centre; bilinear, zero fill."""
    n, c, h, w = images.shape
    angle = degrees.to(device=images.device, dtype=torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output to input positions in [-1, 1] coordinates per axis; the h/w factors
    # keep non-square images rotating rigidly in pixel space.
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=torch.float32)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(images.dtype)


# Normalisation constants, one (1, C, 1, 1) tensor pair per (device, dtype, channels), built once.
# torchvision's ``normalize`` builds them with ``torch.as_tensor(list, device=...)`` on every call:
# on CUDA that is a blocking host-to-device copy (a host sync) twice per batch (pytorch#120996).
_STATS: dict[tuple[torch.device, torch.dtype, int], tuple[torch.Tensor, torch.Tensor]] = {}


def normalization_stats(
    device: torch.device, dtype: torch.dtype = torch.float32, channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as ``(1, C, 1, 1)`` tensors on ``device``, cached (C = 3, or 1 for grey).

    The first call for a device copies them there; every later call returns the same tensors, so
    normalising a batch never touches the host."""
    key = (torch.device(device), dtype, channels)
    stats = _STATS.get(key)
    if stats is None:
        mean, std = (GREY_MEAN, GREY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
        stats = (
            torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1).to(device),
            torch.tensor(std, dtype=dtype).view(1, -1, 1, 1).to(device),
        )
        _STATS[key] = stats
    return stats


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of float images in [0, 1] (RGB, or one grey channel).

    The same arithmetic as torchvision's ``normalize`` (``(x - mean) / std``, bit for bit) with
    device-resident constants (:func:`normalization_stats`): no host sync per batch."""
    mean, std = normalization_stats(images.device, images.dtype, images.shape[1])
    return images.sub(mean).div_(std)


def prepare_batch(
    images: torch.Tensor,
    augmentation: Augmentation | None,
    generator: torch.Generator | None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (N, C, H, W), C = 3 or 1, on any device -> augmented, normalised float32 ready for the model."""
    x = images.float().div_(255.0)
    if augmentation is not None and augmentation.active:
        if generator is None:
            raise ValueError("augmentation needs a generator")
        x = augmentation(x, generator)
    x = normalize(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
