"""The image classifier's loop: GPU figures (CUDA only) and the loop against a DataLoader loop.

One short run, every figure a ratio against a baseline measured in the same run:

* **digits, any device**: images/s of ``objectives.vision.train.train_one_epoch`` (data decoded once
  into uint8 tensors, batches cut, normalised and counted on the device, one read-back per epoch)
  against a classic ``torch.utils.data.DataLoader`` loop over the same images (a per-sample
  transform in ``__getitem__``, ``shuffle=True``, ``loss.item()`` after every batch), same model
  (report 000's MLP at width 64), optimizer (Adam) and batch size. One warm-up epoch each, then the
  loops take turns for ``--epochs`` epochs; a loop's figure is its best epoch.
* **CUDA only** (prints ``no CUDA device: skipped`` without one):
  - ResNet-18 at 224 px, bf16 autocast, channels_last, AdamW, synthetic uint8 images on the
    device: images/s and MFU (model FLOPs per image from ``torch.utils.flop_counter`` on one
    training step, against ``--peak-tflops``, default 989 = H100/H200 dense bf16) at each
    ``--batch-sizes``, for the classic loop (unfused AdamW, torchvision ``Normalize`` per batch,
    ``loss.item()`` per batch: the baseline), this loop eager, and this loop with ``torch.compile``
    (``default`` and ``reduce-overhead`` = CUDA graphs). Compilation time is reported apart.
  - time from trial start (``train(run)``) to the end of the first optimizer step, on a warm
    worker (the dataset already decoded in the worker's cache by a previous trial), eager and
    compiled.

Run: ``.venv/bin/python benchmarks/gpu_loop.py`` (see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from hpo.training import build_optimizer  # noqa: E402
from objectives.vision.augment import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from objectives.vision.data import DataConfig, load_image_data  # noqa: E402
from objectives.vision.losses import Criterion  # noqa: E402
from objectives.vision.models import ImageClassifier, ModelOptions, build_model  # noqa: E402
from objectives.vision.train import (  # noqa: E402
    Device,
    Inputs,
    compiled_forward,
    train_epoch_sums,
    train_one_epoch,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- digits: vs DataLoader


class _PerSample(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The classic pipeline: one image at a time, converted and normalised in ``__getitem__``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div(255.0)
        return TF.normalize(x, list(GREY_MEAN), list(GREY_STD)), self.targets[i]


def digits_ratio(args: argparse.Namespace, device: torch.device) -> None:
    data = load_image_data(DataConfig(format="digits", image_size=8, channels=1), seed=0, device=str(device))
    images, targets = data.train_images, data.train_targets
    options = ModelOptions(
        name="mlp", num_outputs=10, mlp_width=64, mlp_layers=2, in_features=64, in_channels=1
    )
    torch.manual_seed(0)
    model = build_model(options).to(device)
    baseline_model = copy.deepcopy(model)
    optimizer = build_optimizer("adam", model.trainable_parameters(), 1e-3)
    baseline_optimizer = build_optimizer("adam", baseline_model.trainable_parameters(), 1e-3)
    inputs = Inputs(images, targets, data.val_images, data.val_targets, True, False, 10)
    on = Device.for_run(str(device), "fp32")
    loader = DataLoader(
        _PerSample(images.cpu(), targets.cpu()),
        batch_size=args.digits_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )

    def ours(seed: int) -> None:
        train_one_epoch(
            model,
            optimizer,
            Criterion("cross_entropy"),
            inputs,
            batch_size=args.digits_batch_size,
            augmentation=None,
            seed=seed,
            on=on,
        )

    def baseline(seed: int) -> None:
        baseline_model.train()
        total = 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(baseline_model(x), y)
            baseline_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            baseline_optimizer.step()
            total += loss.item()  # the classic per-batch bookkeeping

    ours(0)
    baseline(0)
    best = {"ours": 0.0, "baseline": 0.0}
    for epoch in range(1, args.epochs + 1):
        for name, fn in (("baseline", baseline), ("ours", ours)):
            seconds = _timed(functools.partial(fn, epoch), device)
            best[name] = max(best[name], len(targets) / seconds)
    print(
        f"digits ({device.type}, {len(targets)} training images 8x8 grey, MLP width 64, batch "
        f"{args.digits_batch_size}, best of {args.epochs} epochs): DataLoader loop "
        f"{best['baseline']:,.0f} images/s, vision loop {best['ours']:,.0f} images/s, "
        f"ratio {best['ours'] / best['baseline']:.2f}x"
    )


# --------------------------------------------------------------------------- CUDA: ResNet-18 224 px


def _resnet18(device: torch.device) -> ImageClassifier:
    torch.manual_seed(0)
    model = build_model(ModelOptions(name="resnet18", num_outputs=100)).to(device)
    return model.to(memory_format=torch.channels_last)


def _train_flops_per_image(batch: int, device: torch.device, on: Device) -> float:
    """Model FLOPs of one bf16 training step (forward + backward) divided by the batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _resnet18(device)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    counter = FlopCounterMode(display=False)
    with counter, on.autocast():
        F.cross_entropy(model(x).float(), y).backward()
    return counter.get_total_flops() / batch


def _classic_epoch(
    model: ImageClassifier, optimizer: torch.optim.Optimizer, inputs: Inputs, batch: int
) -> None:
    """The baseline: torchvision Normalize per batch and ``loss.item()`` per batch, unfused AdamW."""
    model.train()
    order = torch.randperm(len(inputs.train_y), device=inputs.train_x.device)
    for start in range(0, len(order) - batch + 1, batch):
        index = order[start : start + batch]
        x = TF.normalize(inputs.train_x[index].float().div_(255.0), list(IMAGENET_MEAN), list(IMAGENET_STD))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), inputs.train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()


def _vision_epoch(
    model: ImageClassifier,
    optimizer: torch.optim.Optimizer,
    inputs: Inputs,
    batch: int,
    on: Device,
    forward: Any,
    seed: int,
) -> None:
    train_epoch_sums(
        model,
        optimizer,
        Criterion("cross_entropy"),
        inputs,
        batch_size=batch,
        augmentation=None,
        seed=seed,
        on=on,
        forward=forward,
    ).compute()


MODES = (("eager", None), ("compile default", "default"), ("compile reduce-overhead", "reduce-overhead"))


def resnet18_figures(args: argparse.Namespace, device: torch.device) -> None:
    torch.backends.cudnn.benchmark = True
    on = Device.for_run("cuda", "bf16")
    print(f"ResNet-18, 224 px, bf16 autocast, channels_last, AdamW; MFU against {args.peak_tflops:g} TFLOP/s")
    for batch in args.batch_sizes:
        n = batch * args.steps
        g = torch.Generator(device=device).manual_seed(0)
        images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, device=device, generator=g)
        targets = torch.randint(0, 100, (n,), device=device, generator=g)
        inputs = Inputs(images, targets, images[:batch], targets[:batch], True, False, 100)
        flops = _train_flops_per_image(batch, device, on)
        rates: dict[str, float] = {}

        model = _resnet18(device)
        classic = build_optimizer("adamw", model.trainable_parameters(), 1e-3, fused=False)
        run_classic = functools.partial(_classic_epoch, model, classic, inputs, batch)
        run_classic()  # warm-up (cuDNN autotuning)
        rates["classic loop (baseline)"] = n / _timed(run_classic, device)

        for label, mode in MODES:
            if label not in args.modes:
                continue
            model = _resnet18(device)
            optimizer = build_optimizer("adamw", model.trainable_parameters(), 1e-3)  # fused on CUDA
            forward = compiled_forward(model, mode) if mode is not None else None
            epoch = functools.partial(_vision_epoch, model, optimizer, inputs, batch, on, forward)
            warm = _timed(functools.partial(epoch, 1), device)
            rates[f"vision loop {label}"] = n / _timed(functools.partial(epoch, 2), device)
            if mode is not None:
                print(f"  batch {batch}: {label}: first epoch (compilation included) {warm:.1f} s")
        base = rates["classic loop (baseline)"]
        for label, rate in rates.items():
            mfu = rate * flops / (args.peak_tflops * 1e12)
            print(
                f"  batch {batch:4d}  {label:32s} {rate:9,.0f} images/s  MFU {100 * mfu:5.1f}%  "
                f"{rate / base:5.2f}x the classic loop"
            )
        print(f"  batch {batch}: {flops / 1e9:.2f} GFLOP per training image (flop counter)")


def first_batch_seconds(args: argparse.Namespace) -> None:
    """Trial start to the end of its first optimizer step, on a worker whose cache is warm."""
    import optuna
    from synthetic_data import make_imagefolder

    from hpo.objective import TrialRun
    from hpo.spec import parse_study
    from objectives.vision.train import train

    stamps: list[float] = []

    def first_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if not stamps:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    handle = torch.optim.optimizer.register_optimizer_step_post_hook(first_step)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_imagefolder(Path(tmp) / "data", classes=10, per_class=40, size=64)
            cache: dict[str, Any] = {}
            for compiled in (False, True) if "compile default" in args.modes else (False,):
                raw = {
                    "name": "ttfb",
                    "objective": "image_classifier",
                    "data": {"format": "imagefolder", "root": str(root), "image_size": 224},
                    "settings": {"model": "resnet18", "batch_size": 16, "compile": compiled},
                    "search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
                    "metric": "val_loss",
                    "direction": "minimize",
                    "n_trials": 3,
                    "budget": {"max_epochs": 1},
                    "seed": 0,
                    "sampler": "random",
                }
                spec = parse_study(raw, "ttfb")
                seconds = []
                for trial in range(2):  # the first warms the worker's cache, the second is timed
                    run = TrialRun(
                        trial=optuna.create_study().ask(),
                        spec=spec,
                        params={"lr": 1e-3},
                        max_epochs=1,
                        device="cuda",
                        checkpoint_dir=Path(tmp) / f"ckpt{compiled}{trial}",
                        cache=cache,
                    )
                    stamps.clear()
                    start = time.perf_counter()
                    train(run)
                    seconds.append(stamps[0] - start)
                label = "compile default" if compiled else "eager"
                print(
                    f"time to first batch ({label}, ResNet-18 224 px, batch 16): cold worker "
                    f"{seconds[0]:.2f} s, warm worker {seconds[1]:.2f} s"
                )
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="digits: timed epochs per loop")
    parser.add_argument("--digits-batch-size", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--steps", type=int, default=40, help="ResNet-18: training steps per timed epoch")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=[label for label, _ in MODES],
        choices=[label for label, _ in MODES],
        help="which vision-loop variants to time (compilation takes a minute or two each)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"torch {torch.__version__}, device: {torch.cuda.get_device_name() if cuda else 'CPU'}")
    digits_ratio(args, device)
    if not cuda:
        print("ResNet-18 images/s and MFU, compile, time to first batch: no CUDA device: skipped")
        return
    resnet18_figures(args, device)
    first_batch_seconds(args)


if __name__ == "__main__":
    main()
