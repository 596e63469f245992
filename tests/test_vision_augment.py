"""Batched device-side augmentation against torchvision's per-image transforms."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from objectives.vision.augment import (
    GREY_MEAN,
    GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
    adjust_colors,
    normalization_stats,
    normalize,
    prepare_batch,
    random_flip,
    rotate,
)


def _images(n: int = 8, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_presets_are_report_004s() -> None:
    assert Augmentation.preset("none") == Augmentation()
    assert Augmentation.preset("flip_jitter") == Augmentation(flip=True, jitter=0.4)
    assert Augmentation.preset("flip_rotation") == Augmentation(flip=True, rotation_degrees=30.0)
    assert Augmentation.preset("flip_jitter_rotation") == Augmentation(True, 0.4, 30.0)


def test_flip_flips_some_images_and_keeps_the_others() -> None:
    images = _images(32)
    out = random_flip(images, torch.Generator().manual_seed(1))
    flipped = [bool(torch.equal(out[i], images[i].flip(-1))) for i in range(32)]
    kept = [bool(torch.equal(out[i], images[i])) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 4 < sum(flipped) < 28


def test_color_factors_match_torchvision_per_image() -> None:
    images = _images(4)
    b = torch.tensor([0.6, 1.0, 1.3, 0.9]).view(4, 1, 1, 1)
    c = torch.tensor([1.4, 0.7, 1.0, 0.6]).view(4, 1, 1, 1)
    s = torch.tensor([0.8, 1.2, 0.6, 1.0]).view(4, 1, 1, 1)
    out = adjust_colors(images, b, c, s)
    for i in range(4):
        expected = TF.adjust_brightness(images[i], float(b[i]))
        expected = TF.adjust_contrast(expected, float(c[i]))
        expected = TF.adjust_saturation(expected, float(s[i]))
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(12, 12), (10, 16)])
def test_rotation_matches_torchvision_rotate(size: tuple[int, int]) -> None:
    h, w = size
    images = _images(2, h, w)
    angles = torch.tensor([180.0, 0.0]) if h != w else torch.tensor([90.0, -90.0])
    out = rotate(images, angles)
    for i in range(2):
        torch.testing.assert_close(out[i], TF.rotate(images[i], float(angles[i])), atol=1e-5, rtol=0)


def test_augmentation_is_reproducible_from_its_seed() -> None:
    aug = Augmentation.preset("flip_jitter_rotation")
    images = _images(16)
    a = aug(images.clone(), torch.Generator().manual_seed(5))
    b = aug(images.clone(), torch.Generator().manual_seed(5))
    c = aug(images.clone(), torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == images.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_prepare_batch_normalises_uint8_with_imagenet_statistics() -> None:
    mean_pixel = torch.tensor([round(m * 255) for m in IMAGENET_MEAN], dtype=torch.uint8)
    batch = mean_pixel.view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    out = prepare_batch(batch, None, None)
    assert out.dtype == torch.float32
    assert float(out.abs().max()) < 0.01  # ImageNet's mean colour maps to ~0
    with pytest.raises(ValueError, match="generator"):
        prepare_batch(batch, Augmentation.preset("flip_jitter"), None)


@pytest.mark.parametrize("channels", [3, 1])
def test_normalize_equals_torchvision_bit_for_bit_with_constants_built_once(channels: int) -> None:
    """The device-resident constants change no value: the result is torchvision's, exactly, and
    the constants are built once per device (torchvision builds them twice per call)."""
    images = torch.rand(5, channels, 7, 9, generator=torch.Generator().manual_seed(3))
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    assert torch.equal(normalize(images), TF.normalize(images, list(mean), list(std)))
    first = normalization_stats(images.device, images.dtype, channels)
    again = normalization_stats(images.device, images.dtype, channels)
    assert first[0] is again[0] and first[1] is again[1]
    assert first[0].shape == (1, channels, 1, 1)
