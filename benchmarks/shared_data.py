"""K trainer processes loading one dataset: one machine-wide decoded copy (``hpo.shared_data``)
against one private copy per process (``HPO_SHARED_DATA=none``, as before), in this one run.

K processes start together (as K slots of ``hpo worker --trials-per-gpu K``, or K workers on one
machine, do) and each calls ``load_image_data`` on the same synthetic ImageFolder tree
(``tests/support/synthetic_data.py``, noisy JPEGs so decoding costs what real photographs cost per
pixel). Printed for each way: the wall time until the last process holds the data, the CPU
seconds the K processes spent loading, and the memory they hold for it together (the sum of each process's
proportional set size, PSS, after loading minus before), then the ratios private / shared.

    .venv/bin/python benchmarks/shared_data.py --k 4 --images 4000 --size 96
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOADER = """
import sys, time
from pathlib import Path

def pss():
    return sum(int(l.split()[1]) for l in Path("/proc/self/smaps_rollup").read_text().splitlines()
               if l.startswith("Pss:")) * 1024

import torch
from objectives.vision.data import DataConfig, load_image_data
config = DataConfig(format="imagefolder", root=sys.argv[1], image_size=int(sys.argv[2]), val_fraction=0.2)
sys.stdin.readline()  # start together
before, cpu = pss(), time.process_time()
data = load_image_data(config, seed=0, workers=1)
_ = int(data.train_images.sum())  # touch every page, as the first epoch does
print(time.time(), pss() - before, time.process_time() - cpu, flush=True)
sys.stdin.readline()  # hold the data until every process has measured
"""


def run(k: int, root: Path, size: int, shared: Path | None) -> tuple[float, float, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    env["HPO_SHARED_DATA"] = str(shared) if shared is not None else "none"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOADER, str(root), str(size)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(k)
    ]
    time.sleep(8.0)  # let every process import torch before the clock starts
    start = time.time()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    ends, memory, cpu = [], 0.0, 0.0
    for p in procs:
        assert p.stdout is not None
        done, held, seconds = p.stdout.readline().split()
        ends.append(float(done))
        memory += float(held)
        cpu += float(seconds)
    for p in procs:
        p.communicate("stop\n", timeout=60)
    return max(ends) - start, cpu, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="processes loading together (default 4)")
    parser.add_argument("--images", type=int, default=4000, help="images in the tree (default 4000)")
    parser.add_argument(
        "--size", type=int, default=96, help="image side in px, decoded and kept (default 96)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from synthetic_data import make_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        classes = 10
        root = make_imagefolder(
            Path(tmp) / "data", classes=classes, per_class=args.images // classes, size=(args.size, args.size)
        )
        # Private first, then shared: a fresh shared folder, so the shared run decodes once too.
        private = run(args.k, root, args.size, None)
        shared = run(args.k, root, args.size, Path(tmp) / "shm")
    for name, (wall, cpu, mem) in (("private", private), ("shared", shared)):
        print(
            f"{name:8s} {args.k} processes: {wall:6.2f} s wall, {cpu:6.2f} CPU s, {mem / 2**20:8.1f} MiB held"
        )
    print(
        f"{args.k} processes x {args.images} images at {args.size} px: shared vs private copies: "
        f"wall {private[0] / shared[0]:.2f}x, CPU {private[1] / shared[1]:.2f}x, "
        f"memory {private[2] / shared[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
