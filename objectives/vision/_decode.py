"""Decode and resize images into one uint8 array, in a thread pool (private to objectives.vision).

PIL releases the GIL while it decodes and resamples, so threads scale with the cores without the
cost of worker processes and of copying pixels between them. Each image is decoded once, resized
so that its shorter side is ``size`` and center-cropped to ``size x size`` (torchvision's
``Resize(size)`` + ``CenterCrop(size)``), and written straight into its slot of the output array.
With ``channels=1`` each image is converted to greyscale right after decoding (PIL's ITU-R 601-2 luma,
what torchvision's ``Grayscale`` does to a PIL image), so the array is a third of the size.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(Exception):
    """An image file is missing or cannot be decoded."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


_decoded = 0
_decoded_lock = threading.Lock()


def decoded_files() -> int:
    """How many image files :func:`decode_images` has been asked to decode in this process so far.

    A plain counter for checks such as "loading CelebA's attributes decodes no image"."""
    return _decoded


def default_workers() -> int:
    """Threads to decode with: the CPUs this process may use, at most 32."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(32, cpus))


def _load(path: str, size: int, channels: int = 3) -> np.ndarray:
    try:
        with Image.open(path) as image:
            # JPEG only: decode at the smallest 1/2, 1/4 or 1/8 scale whose sides are still >= size,
            # which makes large photos several times cheaper to decode; other formats ignore it.
            image.draft("RGB", (size, size))
            # Palette images with transparency go through RGBA, as PIL asks; RGB then drops alpha
            # like torchvision's ImageFolder loader does.
            opaque = image.convert("RGBA") if image.mode == "P" and "transparency" in image.info else image
            rgb = opaque.convert("RGB")
            if channels == 1:  # after RGB, as ImageFolder's loader + transforms.Grayscale would
                rgb = rgb.convert("L")
    except FileNotFoundError:
        raise DecodeError(path, "file does not exist") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise DecodeError(path, f"cannot decode image ({exc})") from None
    return _fit(rgb, size)


def _fit(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size``, centre ``size x size`` crop, as a (C, size, size) array."""
    fitted = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
    pixels = np.asarray(fitted)
    return pixels[np.newaxis] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _fit_array(pixels: np.ndarray, size: int, channels: int) -> np.ndarray:
    """One in-memory (3, H, W) uint8 image through the same conversions and resize as a file."""
    if channels == 3 and pixels.shape[1] == pixels.shape[2] == size:
        return pixels  # already the right size: ImageOps.fit would return the same pixels
    image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB")
    return _fit(image.convert("L") if channels == 1 else image, size)


def decode_images(
    files: Sequence[str], size: int, workers: int | None = None, channels: int = 3
) -> np.ndarray:
    """``(N, channels, size, size)`` uint8 array of ``files`` in order (``channels`` 3: RGB, 1: grey);
    raises :class:`DecodeError`."""
    global _decoded
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    with _decoded_lock:
        _decoded += len(files)
    return _in_pool(len(files), lambda i: _load(files[i], size, channels), size, channels, workers)


def fit_arrays(pixels: np.ndarray, size: int, workers: int | None = None, channels: int = 3) -> np.ndarray:
    """In-memory ``(N, 3, H, W)`` uint8 images (STL-10's binaries) to ``(N, channels, size, size)``,
    resized and cropped as :func:`decode_images` does to files (same PIL conversions and resampling)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    return _in_pool(len(pixels), lambda i: _fit_array(pixels[i], size, channels), size, channels, workers)


def _in_pool(
    n: int, one: Callable[[int], np.ndarray], size: int, channels: int, workers: int | None
) -> np.ndarray:
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    workers = workers or default_workers()

    def fill(start: int, stop: int) -> None:
        for i in range(start, stop):
            out[i] = one(i)

    # Chunks amortise the executor's per-task overhead; several per thread balance the load.
    chunk = max(1, min(256, n // (workers * 4) or 1))
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if workers == 1 or len(bounds) <= 1:
        for start, stop in bounds:
            fill(start, stop)
        return out
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hpo-decode") as pool:
        futures = [pool.submit(fill, start, stop) for start, stop in bounds]
        try:
            for future in futures:
                future.result()
        except DecodeError:
            for future in futures:
                future.cancel()  # stop queued chunks; running ones finish their slice
            raise
    return out
