"""Decode throughput of the vision data layer against torchvision's per-epoch ImageFolder pipeline.

Writes a synthetic ImageFolder tree of JPEG photos-sized images into a temporary folder, then
measures, in the same run:

* baseline: one epoch through ``torchvision.datasets.ImageFolder`` with ``Resize`` +
  ``CenterCrop`` + ``PILToTensor`` in a ``DataLoader`` (``num_workers=0``), which a plain training
  loop pays every epoch of every trial;
* ``load_image_data`` with 1 decoding thread and with the default thread count (paid once per
  worker), and the cached call every later trial makes.

Prints images/s and the ratios. Run: ``.venv/bin/python benchmarks/datasets_decode.py [--images N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from synthetic_data import make_imagefolder  # noqa: E402

from objectives.vision import DataConfig, load_image_data  # noqa: E402
from objectives.vision._decode import default_workers  # noqa: E402


def _timed(function: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    best = float("inf")
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200, help="images in the tree (default 1200)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        classes = 10
        per_class = args.images // classes
        root = make_imagefolder(Path(tmp) / "tree", classes, per_class, size=(args.width, args.height))
        n = classes * per_class
        size = args.image_size

        pipeline = transforms.Compose(
            [transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()]
        )
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), pipeline), batch_size=256)
        baseline, _ = _timed(lambda: [batch for batch in loader], repeat=2)

        config = DataConfig(format="imagefolder", root=str(root), image_size=size, val_fraction=0.2)
        one_thread, _ = _timed(lambda: load_image_data(config, seed=0, workers=1), repeat=2)
        threads = default_workers()
        pooled, _ = _timed(lambda: load_image_data(config, seed=0), repeat=2)
        cache: dict[str, object] = {}
        load_image_data(config, seed=0, cache=cache)
        cached, _ = _timed(lambda: load_image_data(config, seed=0, cache=cache), repeat=5)

    print(f"{n} JPEG images {args.width}x{args.height} -> {size}x{size}, {threads} decoding threads")
    print(f"baseline ImageFolder+DataLoader epoch : {baseline:7.3f} s  {n / baseline:8.0f} img/s")
    print(f"load_image_data, 1 thread            : {one_thread:7.3f} s  {n / one_thread:8.0f} img/s")
    print(f"load_image_data, {threads:2d} threads          : {pooled:7.3f} s  {n / pooled:8.0f} img/s")
    print(f"load_image_data, cached (trial 2+)   : {cached * 1e6:7.1f} us")
    print(f"ratio one-time decode (1 thread) vs one baseline epoch : {baseline / one_thread:5.2f}x faster")
    print(f"ratio threads vs 1 thread                              : {one_thread / pooled:5.2f}x")
    print(f"ratio one-time decode vs baseline over 10 trials x 20 epochs: {200 * baseline / pooled:7.0f}x")


if __name__ == "__main__":
    main()
