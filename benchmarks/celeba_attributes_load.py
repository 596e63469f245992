"""Report 000's attribute MLP: loading CelebA with and without decoding the images.

Writes a synthetic CelebA tree (``make_celeba``: 178x178 JPEGs, about the aligned images' 178x218, the 40
attributes, a partition file) into a temporary folder, then times in the same run:

* baseline: ``data: {format: celeba, image_size: 8}`` (what the study file did: every image decoded,
  its pixels never used by the MLP);
* ``data: {format: celeba, inputs: attributes}``: the attribute table only, nothing decoded.

Prints both times and their ratio.  Run:  python benchmarks/celeba_attributes_load.py --images 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from synthetic_data import make_celeba  # noqa: E402

from objectives.vision import DataConfig, load_image_data  # noqa: E402
from objectives.vision._decode import decoded_files  # noqa: E402


def timed(config: DataConfig, repeats: int) -> tuple[float, int]:
    """Best wall time of ``repeats`` uncached loads, and the image files decoded by one of them."""
    best = float("inf")
    decoded = 0
    for _ in range(repeats):
        before = decoded_files()
        start = time.perf_counter()
        load_image_data(config, seed=0)
        best = min(best, time.perf_counter() - start)
        decoded = decoded_files() - before
    return best, decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_celeba(Path(tmp) / "celeba", n=args.images, size=178)
        images = DataConfig(format="celeba", root=str(root), image_size=8)
        attributes = DataConfig(format="celeba", root=str(root), inputs="attributes")
        base, base_decoded = timed(images, args.repeats)
        fast, fast_decoded = timed(attributes, args.repeats)
    print(f"{args.images} synthetic CelebA images, best of {args.repeats} uncached loads")
    print(f"  image_size: 8 (decodes every image): {base:8.3f} s   {base_decoded} files decoded")
    print(f"  inputs: attributes (no decoding):    {fast:8.3f} s   {fast_decoded} files decoded")
    print(f"  ratio: {base / fast:.1f}x faster")


if __name__ == "__main__":
    main()
