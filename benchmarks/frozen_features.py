"""Epoch time with the frozen-feature cache against recomputing the frozen backbone every epoch.

Two of the reports' frozen-backbone searches, each trained both ways in this one run from the same
seed, on the same synthetic images, with the objective's own ``train_one_epoch`` and ``evaluate``:

* ``alexnet``: report 004's frozen-convolution AlexNet grid (``transfer: features``: the
  convolutional part frozen, the hidden FC layers and the new last layer train; SGD, momentum 0.9,
  101 classes) at ``--alexnet-size`` px (default 224, the study's);
* ``encoder_mlp``: report 000's frozen ResNet-18 encoder + residual MLP head (256 wide, 11 layers),
  AdamW, batch size 16, one binary attribute (BCE), at ``--encoder-size`` px (default 64, the
  study's), with ``frozen_mode: eval`` (with the reports' default ``train`` the encoder's batch
  norm uses batch statistics, so its features are not fixed and the cache refuses).

An epoch is one training pass plus validation. Recompute (``feature_cache: off``) runs the whole
model on normalised uint8 images, as the objective did before the cache; cached runs the
trainable part on the features that :func:`objectives.vision.features.use_feature_cache` computed
once (timed separately: paid once per worker and dataset, for all its trials). Weights are random
(nothing is downloaded): the work per epoch is the same as with ImageNet weights. Each way runs a
warm-up epoch, then the two take turns for ``--epochs`` timed epochs (so a change in the machine's
load hits both); a figure is the best epoch. Printed per model: seconds per epoch each way, their
ratio, and the ratio over a ``--trial-epochs`` trial with the one-time feature computation charged
to it.

Run: ``.venv/bin/python benchmarks/frozen_features.py [--threads 1] [--models alexnet,encoder_mlp]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from hpo.training import build_optimizer  # noqa: E402
from objectives.vision.features import use_feature_cache  # noqa: E402
from objectives.vision.losses import Criterion  # noqa: E402
from objectives.vision.models import ImageClassifier, ModelOptions, build_model  # noqa: E402
from objectives.vision.train import Device, Inputs, evaluate, train_one_epoch  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One of the reports' frozen-backbone configurations, at a benchmark size."""

    name: str
    options: ModelOptions
    inputs: Inputs
    criterion: Criterion
    optimizer: str
    lr: float
    batch_size: int
    eval_batch_size: int


def synthetic_inputs(n_train: int, n_val: int, size: int, classes: int, multilabel: bool) -> Inputs:
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)

    def targets(n: int) -> torch.Tensor:
        if multilabel:
            return torch.randint(0, 2, (n, classes), generator=generator).float()
        return torch.randint(0, classes, (n,), generator=generator)

    return Inputs(images(n_train), targets(n_train), images(n_val), targets(n_val), True, multilabel, classes)


def cases(args: argparse.Namespace) -> dict[str, Case]:
    n_val = max(2, args.images // 5)
    return {
        "alexnet": Case(
            "alexnet",
            ModelOptions(name="alexnet", num_outputs=101, transfer="features"),
            synthetic_inputs(args.images, n_val, args.alexnet_size, 101, multilabel=False),
            Criterion("cross_entropy"),
            "sgd",
            5e-3,
            args.alexnet_batch,
            256,
        ),
        "encoder_mlp": Case(
            "encoder_mlp",
            ModelOptions(name="resnet18_mlp", num_outputs=1, transfer="features", frozen_mode="eval"),
            synthetic_inputs(args.images, n_val, args.encoder_size, 1, multilabel=True),
            Criterion("bce"),
            "adamw",
            1e-3,
            16,
            256,
        ),
    }


class Loop:
    """One case trained one way: ``cached`` on features, else recomputing the frozen part."""

    def __init__(self, case: Case, cached: bool, cache: dict[str, Any], on: Device) -> None:
        torch.manual_seed(0)
        self.model: ImageClassifier = build_model(case.options).to(on.device)
        self.case, self.on = case, on
        self.optimizer = build_optimizer(case.optimizer, self.model.trainable_parameters(), lr=case.lr)
        start = time.perf_counter()
        self.net, self.inputs = use_feature_cache(
            "auto" if cached else "off",
            self.model,
            case.inputs,
            augmentation=None,
            cache=cache,
            data_key=case.name,
            batch_size=case.eval_batch_size,
            device=on.device,
            bf16=on.bf16,
        )
        _sync(on.device)
        self.setup_seconds = time.perf_counter() - start
        if cached and self.net is self.model:
            raise RuntimeError(f"{case.name}: the feature cache did not apply")

    def epoch(self, seed: int) -> None:
        train_one_epoch(
            self.net,
            self.optimizer,
            self.case.criterion,
            self.inputs,
            batch_size=self.case.batch_size,
            augmentation=None,
            seed=seed,
            on=self.on,
        )
        evaluate(self.net, self.case.criterion, self.inputs, batch_size=self.case.eval_batch_size, on=self.on)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def bench(case: Case, args: argparse.Namespace, on: Device) -> tuple[float, float, float]:
    """(best recompute epoch s, best cached epoch s, one-time feature computation s)."""
    recompute = Loop(case, cached=False, cache={}, on=on)
    cached = Loop(case, cached=True, cache={}, on=on)
    loops = {"recompute": recompute, "cached": cached}
    best = {name: float("inf") for name in loops}
    for loop in loops.values():  # warm-up
        loop.epoch(0)
    for epoch in range(1, args.epochs + 1):
        for name, loop in loops.items():
            best[name] = min(best[name], _timed(functools.partial(loop.epoch, epoch), on.device))
    return best["recompute"], best["cached"], cached.setup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="alexnet,encoder_mlp", help="alexnet, encoder_mlp")
    parser.add_argument("--images", type=int, default=512, help="training images (validation: a fifth)")
    parser.add_argument(
        "--alexnet-size", type=int, default=224, help="AlexNet's resolution (report 004: 224)"
    )
    parser.add_argument("--alexnet-batch", type=int, default=256, help="AlexNet's batch (report 004's: 256)")
    parser.add_argument("--encoder-size", type=int, default=64, help="encoder's resolution (report 000: 64)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of each way, after a warm-up")
    parser.add_argument("--trial-epochs", type=int, default=20, help="trial length for the charged ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU one thread gives stable figures
    on = Device.for_run(args.device, args.precision)
    if on.cuda:
        torch.backends.cudnn.benchmark = True
    print(
        f"device {on.device}, bf16 {on.bf16}, threads {torch.get_num_threads()}, {args.images} train + "
        f"{max(2, args.images // 5)} val images; best of {args.epochs} epochs after a warm-up"
    )
    table = cases(args)
    for name in args.models.split(","):
        case = table[name]
        size = case.inputs.train_x.shape[-1]
        slow, fast, setup = bench(case, args, on)
        n = args.trial_epochs
        print(
            f"{name} ({size} px, batch {case.batch_size}): recompute {slow:.3f} s/epoch, cached "
            f"{fast:.3f} s/epoch, ratio {slow / fast:.1f}x; features once {setup:.3f} s, "
            f"{n}-epoch trial with it charged: ratio {n * slow / (n * fast + setup):.1f}x"
        )


if __name__ == "__main__":
    main()
