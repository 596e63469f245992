"""Images per second: the image_classifier objective's training loop against a classic DataLoader loop.

Both loops train the same model (default: ResNet-18, report 003's) from the same seed on the same
images (a synthetic ImageFolder tree of JPEGs written to a temporary folder), with the same batch
size, optimizer (SGD, momentum 0.9) and augmentation preset, in this one run:

* baseline, how the reports trained: ``torchvision.datasets.ImageFolder`` with torchvision
  transforms (Resize + CenterCrop, the preset's RandomHorizontalFlip / ColorJitter /
  RandomRotation, ToTensor, Normalize) in a ``torch.utils.data.DataLoader(shuffle=True)``, every
  image decoded and augmented on the host each epoch, ``loss.item()`` after every batch; measured
  with each ``--workers`` count, and the fastest is the baseline;
* hpo: ``load_image_data`` decodes and resizes once into uint8 tensors (timed separately, paid
  once per worker for all its trials), then ``objectives.vision.train.train_one_epoch`` cuts
  batches from them, augments and normalises on the device, and syncs once per epoch.

Each loop runs one warm-up epoch, then the loops take turns for ``--epochs`` timed epochs each (so
a change in the machine's load hits them alike); a loop's figure is its best epoch. Printed:
images/s of each, the ratio to the fastest baseline, and the ratio with hpo's one-time decode
charged to the timed epochs. ``--precision bf16`` runs the objective with bf16 autocast (its
``precision`` option); the baseline always trains in fp32 as the reports did. On a CPU shared with
other jobs, ``--threads 1`` gives stable figures.

Run: ``.venv/bin/python benchmarks/vision_throughput.py [--model resnet18] [--image-size 64]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from synthetic_data import make_imagefolder  # noqa: E402

from hpo.training import build_optimizer  # noqa: E402
from objectives.vision.augment import IMAGENET_MEAN, IMAGENET_STD, Augmentation  # noqa: E402
from objectives.vision.data import DataConfig, load_image_data  # noqa: E402
from objectives.vision.losses import Criterion  # noqa: E402
from objectives.vision.models import ImageClassifier, ModelOptions, build_model  # noqa: E402
from objectives.vision.train import Device, Inputs, train_one_epoch  # noqa: E402


def make_model(name: str, classes: int, image_size: int, device: torch.device) -> ImageClassifier:
    torch.manual_seed(0)
    options = ModelOptions(name=name, num_outputs=classes, in_features=3 * image_size * image_size)  # type: ignore[arg-type]
    return build_model(options).to(device)


def classic_transform(image_size: int, preset: str) -> transforms.Compose:
    aug = Augmentation.preset(preset)  # type: ignore[arg-type]
    steps: list[object] = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if aug.flip:
        steps.append(transforms.RandomHorizontalFlip())
    if aug.jitter:
        steps.append(transforms.ColorJitter(aug.jitter, aug.jitter, aug.jitter))
    if aug.rotation_degrees:
        steps.append(transforms.RandomRotation(aug.rotation_degrees))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


class BaselineLoop:
    """How the reports trained: a DataLoader over the image files with torchvision transforms."""

    def __init__(self, args: argparse.Namespace, root: Path, workers: int, device: torch.device) -> None:
        dataset = datasets.ImageFolder(str(root), transform=classic_transform(args.image_size, args.augment))
        self.loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )
        self.device = device
        self.images = len(dataset)
        self.model = make_model(args.model, len(dataset.classes), args.image_size, device)
        self.optimizer = build_optimizer("sgd", self.model.parameters(), lr=0.01, momentum=0.9)

    def epoch(self, seed: int) -> None:
        self.model.train()
        running = 0.0
        for x, y in self.loader:
            x, y = x.to(self.device), y.to(self.device)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            running += loss.item()  # the reports' per-batch bookkeeping (a host sync per batch)


class HpoLoop:
    """The objective's loop: decoded once into uint8 tensors, augmented on the device."""

    def __init__(self, args: argparse.Namespace, root: Path, device: torch.device) -> None:
        config = DataConfig(
            format="imagefolder", root=str(root), image_size=args.image_size, val_fraction=0.05
        )
        start = time.perf_counter()
        data = load_image_data(config, seed=0, device=str(device))
        self.decode_seconds = time.perf_counter() - start
        # All images train, as in the baseline (the data layer always splits off a validation part).
        images = torch.cat([data.train_images, data.val_images])
        targets = torch.cat([data.train_targets, data.val_targets])
        self.images = len(targets)
        self.inputs = Inputs(
            images, targets, data.val_images, data.val_targets, True, False, len(data.classes)
        )
        self.on = Device.for_run(str(device), args.precision)
        if self.on.cuda:
            torch.backends.cudnn.benchmark = True
        self.model = make_model(args.model, len(data.classes), args.image_size, device)
        if self.on.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer("sgd", self.model.trainable_parameters(), lr=0.01, momentum=0.9)
        self.augmentation = Augmentation.preset(args.augment)
        self.batch_size = args.batch_size

    def epoch(self, seed: int) -> None:
        train_one_epoch(
            self.model,
            self.optimizer,
            Criterion("cross_entropy"),
            self.inputs,
            batch_size=self.batch_size,
            augmentation=self.augmentation,
            seed=seed,
            on=self.on,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_epoch(loop: BaselineLoop | HpoLoop, seed: int, device: torch.device) -> float:
    """Images per second of one epoch."""
    _sync(device)
    start = time.perf_counter()
    loop.epoch(seed)
    _sync(device)
    return loop.images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="resnet18", help="alexnet, vgg16, resnet18, resnet50, efficientnet_b0, mlp"
    )
    parser.add_argument("--image-size", type=int, default=64, help="training resolution (default 64)")
    parser.add_argument("--source-size", type=int, default=96, help="side of the JPEGs on disk (default 96)")
    parser.add_argument("--images", type=int, default=1024, help="images in the dataset (default 1024)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each loop, after a warm-up")
    parser.add_argument(
        "--augment", default="flip_jitter_rotation", help="augmentation preset (default: all three)"
    )
    parser.add_argument(
        "--workers",
        default=f"0,{os.cpu_count() or 1}",
        help="DataLoader worker counts to try for the baseline",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the objective's precision option (auto: bf16 autocast on CUDA, fp32 on CPU); "
        "the baseline always trains in fp32, as the reports did",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads for both loops (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        # On a CPU shared with other jobs, torch's default of one thread per core makes every
        # parallel region wait for a descheduled peer; one thread gives stable figures there.
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = make_imagefolder(
            Path(tmp) / "images",
            classes=args.classes,
            per_class=args.images // args.classes,
            size=args.source_size,
        )
        print(
            f"{args.model} on {device} ({torch.get_num_threads()} threads), {args.images} JPEGs of "
            f"{args.source_size}px trained at {args.image_size}px, batch {args.batch_size}, "
            f"augment {args.augment}, {args.epochs} timed epochs, hpo precision {args.precision}"
        )
        loops: dict[str, BaselineLoop | HpoLoop] = {
            f"baseline DataLoader, num_workers={w}": BaselineLoop(args, root, w, device)
            for w in sorted({int(w) for w in args.workers.split(",")})
        }
        hpo = HpoLoop(args, root, device)
        loops["hpo objective loop"] = hpo
        for loop in loops.values():
            loop.epoch(0)  # warm-up (and the OS file cache for the baseline)
        # Epochs of the loops take turns, so a change in the machine's load hits all of them alike;
        # each loop's best epoch is its figure (the least disturbed by other work).
        rates: dict[str, list[float]] = {name: [] for name in loops}
        for epoch in range(1, args.epochs + 1):
            for name, loop in loops.items():
                rates[name].append(_timed_epoch(loop, epoch, device))
        best = {name: max(values) for name, values in rates.items()}
        for name, value in best.items():
            print(f"  {name:38s} {value:8.1f} images/s (best of {args.epochs} epochs)")
        print(f"  hpo one-time decode of {hpo.images} images: {hpo.decode_seconds:.2f}s")
        baseline_name = max((n for n in best if n.startswith("baseline")), key=lambda n: best[n])
        baseline = best[baseline_name]
        rate = best["hpo objective loop"]
        print(f"ratio hpo / fastest baseline ({baseline_name.split(', ')[1]}): {rate / baseline:.2f}x")
        epochs_cost = hpo.images * args.epochs / rate
        charged = hpo.images * args.epochs / (epochs_cost + hpo.decode_seconds) / baseline
        print(f"ratio with the one-time decode charged to {args.epochs} epochs: {charged:.2f}x")


if __name__ == "__main__":
    main()
