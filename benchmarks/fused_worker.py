"""Trials per hour of ``hpo worker --fuse K`` against ``hpo worker``, on the digits quickstart MLP,
report 000's MLP (``--model r000-mlp``), a grid shaped like report 002's (``--model digits-grid``),
a tiny ResNet-18 (``--model resnet18``), AlexNet trained from scratch (``--model alexnet``) or
report 004's frozen-convolution AlexNet (``--model alexnet-features``, ``alexnet-features-augment``)
or report 003's losses (``--model r003-losses``).

Both workers are real CLI processes on their own SQLite study (same file, same trials: a random
search over the learning rate, weight decay and the schedule, which all fuse), run one after
the other in this run, each with one thread (``--threads 1``, ``OMP_NUM_THREADS=1``). The rate is
counted over the study's training span (first trial started to last trial finished, from the
trials' own timestamps), so process start-up, the same for both, does not dilute it; the
workers' whole wall times are printed too.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fused_worker.py --k 8 --trials 32 --rounds 3
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fused_worker.py --model r000-mlp --trials 16 --epochs 3
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fused_worker.py --model digits-grid --trials 16
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fused_worker.py --model resnet18 --k 4 --trials 8

``--model digits-grid``: report 002's grid shape, learning rate x batch size (32, 64) with the batch
size varying fastest in the queue, ``--trials / 2`` learning rates, grid sampler: a group takes the
queued grid points of its first member's batch size.

``--model r000-mlp``: report 000's residual MLP (``attribute_mlp``, width 256, 11 layers, batch 16,
AdamW + ExponentialLR over the report's search space) on ``--rows`` synthetic CelebA attribute
rows (``make_celeba``; 60% train, 20% validation), fused by ``objectives/vision/_fused_mlp.py``.

``--model resnet18``: SGD (momentum 0.9), ``transfer: scratch``, batch 16, on a synthetic
ImageFolder tree (``tests/support/synthetic_data.py``: 4 classes x 16 solid-colour images,
``--image-size`` px, a quarter held out), fused by ``objectives/vision/_fused_cnn.py``.

``--model alexnet``: report 004's AlexNet learning-rate and weight-decay searches in small: every
layer trains (``transfer: scratch``), SGD with momentum 0.9, batch 16, 63 px.

``--model alexnet-features``: AlexNet with frozen convolutions (``transfer: features``, random
weights: no download), SGD over learning rate, weight decay and momentum, batch 16, on the same
synthetic tree at 63 px (AlexNet's minimum): both workers train the classifier on cached features
(one computation per worker). ``alexnet-features-augment`` adds ``augment: flip_jitter``: no
cache, so the unfused trial runs the convolutions every batch and the fused group once per batch
for all its members (``objectives/vision/_fused_frozen.py``). ``alexnet-fc-frozen``: report 004's
``transfer: classifier`` (hidden FC layers frozen between the trained convolutions and the new last
layer; each member runs its own in turn). ``resnet18-features-augment``: a
frozen ResNet-18 (batch norm adapting, ``frozen_mode: train``), augmented, only the new last layer
trains: report 004's frozen ResNet-50 BOHB study in small.

``--model r003-losses``: report 003's tuning study in small (``studies/r003_tiny_imagenet_tuning.yaml``):
a greyscale ResNet-18 from scratch, SGD, each trial drawing its loss (cross-entropy, batch-hard
triplet, center loss with lambda 0.1 or 1) with its learning rate, momentum and weight decay, on
the synthetic tree at ``--image-size`` px, batch 16; members of one group differ in their loss.

``--storage URL`` runs both workers on a PostgreSQL database instead (each study under a name of
its own), where every claim and result is a network round trip.

``--rounds N`` alternates N unfused/fused pairs and prints the median rates and each round's ratio
(this machine is shared and noisy: compare only within a run).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
name: {name}
objective: digits_mlp
data: {{val_fraction: 0.2}}
settings: {{hidden_units: {hidden}, hidden_layers: 2, optimizer: adam, batch_size: 64, scheduler: step}}
search_space:
  lr: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}}
  weight_decay: {{type: float, low: 1.0e-6, high: 1.0e-2, log: true}}
  step_size: {{type: int, low: 2, high: 10}}
  gamma: {{type: float, low: 0.1, high: 0.9}}
metric: val_loss
direction: minimize
n_trials: {trials}
budget: {{max_epochs: {epochs}}}
seed: 0
sampler: {sampler}
"""


# Report 002's grid shape (search_spaces/r002_lr_batch.yaml: learning rate x batch size, the batch
# size varying fastest in the queue) on the digits MLP: --trials / 2 learning rates x 2 batch sizes.
GRID_STUDY = """
name: {name}
objective: digits_mlp
data: {{val_fraction: 0.2}}
settings: {{hidden_units: {hidden}, hidden_layers: 2, optimizer: adam, scheduler: step, step_size: 4,
           gamma: 0.5}}
search_space:
  lr: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true, grid: {lrs}}}
  batch_size: {{type: int, low: 16, high: 128, grid: [32, 64]}}
metric: val_loss
direction: minimize
budget: {{max_epochs: {epochs}}}
seed: 0
sampler: grid
"""

CNN_STUDY = """
name: {name}
objective: image_classifier
data: {{format: imagefolder, root: {root}, image_size: {size}, val_fraction: 0.25}}
settings: {{{settings}}}
search_space:
  lr: {{type: float, low: 1.0e-3, high: 1.0e-1, log: true}}
  weight_decay: {{type: float, low: 1.0e-6, high: 1.0e-2, log: true}}
  step_size: {{type: int, low: 1, high: 3}}
  gamma: {{type: float, low: 0.1, high: 0.9}}
metric: val_loss
direction: minimize
n_trials: {trials}
budget: {{max_epochs: {epochs}}}
seed: 0
sampler: {sampler}
"""

# Report 000's residual MLP (studies/r000_celeba_attribute_mlp.yaml: width 256, 11 layers, batch
# norm, LeakyReLU, skip connections, batch 16, AdamW + ExponentialLR) on synthetic CelebA
# attributes, searching the report's space (search_spaces/r000_adamw_exponential.yaml).
R000_STUDY = """
name: {name}
objective: image_classifier
data: {{format: celeba, root: {root}, inputs: attributes}}
settings: {{model: attribute_mlp, target_attribute: Attractive, optimizer: adamw, scheduler: exponential,
           batch_size: 16}}
search_space:
  lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
  weight_decay: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}}
  gamma: {{type: float, low: 0.80, high: 0.99}}
metric: val_loss
direction: minimize
n_trials: {trials}
budget: {{max_epochs: {epochs}}}
seed: 0
sampler: {sampler}
"""


# Report 003's tuning study (studies/r003_tiny_imagenet_tuning.yaml) on the synthetic tree, greyscale.
R003_STUDY = """
name: {name}
objective: image_classifier
data: {{format: imagefolder, root: {root}, image_size: {size}, val_fraction: 0.25, channels: 1}}
settings: {{model: resnet18, transfer: scratch, optimizer: sgd, batch_size: 16, scheduler: none,
           triplet_margin: 0.2}}
search_space:
  loss:               {{type: categorical, choices: [cross_entropy, triplet, center]}}
  center_loss_lambda: {{type: categorical, choices: [0.1, 1.0], when: {{loss: [center]}}}}
  lr:                 {{type: float, low: 1.0e-3, high: 2.0e-1, log: true}}
  momentum:           {{type: float, low: 0.5, high: 0.99}}
  weight_decay:       {{type: float, low: 1.0e-5, high: 1.0e-2, log: true}}
metric: val_top5
direction: maximize
n_trials: {trials}
budget: {{max_epochs: {epochs}}}
seed: 0
sampler: {sampler}
"""


def hpo(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``hpo ARGS``; its wall seconds and CPU seconds (with its trainer process's)."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(
        [sys.executable, "-m", "hpo", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"hpo {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start, _children_cpu() - cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def span(url: str, name: str) -> tuple[int, float]:
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) != len(trials):
        raise SystemExit(f"study {name}: {len(complete)} of {len(trials)} trials complete")
    first = min(t.datetime_start for t in trials if t.datetime_start is not None)
    last = max(t.datetime_complete for t in trials if t.datetime_complete is not None)
    return len(complete), (last - first).total_seconds()


CNN_SETTINGS = {
    "resnet18": "model: resnet18, optimizer: sgd, batch_size: 16, scheduler: step",
    # Report 004's AlexNet learning-rate / weight-decay searches, every layer trained (no download).
    "alexnet": "model: alexnet, transfer: scratch, optimizer: sgd, momentum: 0.9, batch_size: 16, "
    "scheduler: step",
    "alexnet-features": "model: alexnet, transfer: features, pretrained: false, optimizer: sgd, "
    "momentum: 0.9, batch_size: 16, scheduler: step",
}
CNN_SETTINGS["alexnet-features-augment"] = CNN_SETTINGS["alexnet-features"] + ", augment: flip_jitter"
# Report 004's "all FC frozen except FC[6]" (studies/r004_caltech_fc_frozen_sgd.yaml): the
# convolutions and the new last layer train, the hidden FC layers between them are frozen.
CNN_SETTINGS["alexnet-fc-frozen"] = (
    "model: alexnet, transfer: classifier, pretrained: false, optimizer: sgd, momentum: 0.9, "
    "batch_size: 16, scheduler: step"
)
# Report 004's ResNet-50 BOHB study shape (studies/r004_caltech_resnet50_bohb_features.yaml): a frozen
# ResNet whose batch norm adapts (frozen_mode: train), augmented, only the new last layer trains.
CNN_SETTINGS["resnet18-features-augment"] = (
    "model: resnet18, transfer: features, pretrained: false, augment: flip_jitter, optimizer: sgd, "
    "momentum: 0.9, batch_size: 16, scheduler: step"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="trials per fused group (default 8)")
    parser.add_argument("--trials", type=int, default=16, help="trials per study (default 16)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128, help="hidden units (quickstart: 128)")
    models = ["digits", "digits-grid", "r000-mlp", "r003-losses", *CNN_SETTINGS]
    parser.add_argument("--model", choices=models, default="digits")
    parser.add_argument("--rows", type=int, default=2000, help="r000-mlp: CelebA rows (default 2000)")
    parser.add_argument("--image-size", type=int, default=32, help="resnet18: image size (default 32)")
    parser.add_argument(
        "--sampler",
        choices=["random", "tpe"],
        default="random",
        help="the sampler of the searches (not digits-grid); tpe asks after each group's results",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="unfused/fused pairs, alternating (default 1); medians printed"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="a PostgreSQL URL to run the studies on (each under its own name); default: a new "
        "SQLite file per worker",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    env.pop("OPTUNA_STORAGE", None)
    rates: dict[str, list[float]] = {"unfused": [], "fused": []}
    cpu: dict[str, list[float]] = {"unfused": [], "fused": []}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = None
        if args.model.startswith("alexnet"):
            args.image_size = max(args.image_size, 63)  # AlexNet's smallest input
        if args.model in CNN_SETTINGS or args.model == "r003-losses":
            sys.path.insert(0, str(ROOT / "tests" / "support"))
            from synthetic_data import make_imagefolder

            images = make_imagefolder(folder / "images", classes=4, per_class=16, size=args.image_size)
        if args.model == "r000-mlp":
            sys.path.insert(0, str(ROOT / "tests" / "support"))
            from synthetic_data import make_celeba

            images = make_celeba(folder / "celeba", n=args.rows, size=8)
        for round_ in range(args.rounds):
            for name, extra in (("unfused", []), ("fused", ["--fuse", str(args.k)])):
                rate, seconds = one_worker(folder / f"r{round_}", name, extra, args, images, env)
                rates[name].append(rate)
                cpu[name].append(seconds)
            ratios.append(rates["fused"][-1] / rates["unfused"][-1])
    what = {
        "resnet18": f"resnet18 ({args.image_size} px, 48 training images, batch 16",
        "alexnet": f"alexnet from scratch ({args.image_size} px, 48 training images, batch 16",
        "alexnet-features": (
            f"frozen-conv alexnet, cached features ({args.image_size} px, 48 training images, batch 16"
        ),
        "alexnet-features-augment": (
            f"frozen-conv alexnet, augmented ({args.image_size} px, 48 training images, batch 16"
        ),
        "alexnet-fc-frozen": (
            f"alexnet, hidden FC layers frozen ({args.image_size} px, 48 training images, batch 16"
        ),
        "resnet18-features-augment": (
            f"frozen resnet18, augmented ({args.image_size} px, 48 training images, batch 16"
        ),
        "r003-losses": (
            f"report 003's losses, greyscale resnet18 ({args.image_size} px, 48 training images, batch 16"
        ),
        "r000-mlp": f"report 000's MLP ({args.rows} synthetic CelebA rows, 60% for training, batch 16",
        "digits": f"digits MLP ({args.hidden} hidden units",
        "digits-grid": f"digits MLP grid of lr x batch size 32/64 ({args.hidden} hidden units",
    }[args.model]
    fused, unfused = statistics.median(rates["fused"]), statistics.median(rates["unfused"])
    spread = f" (rounds: {', '.join(f'{r:.2f}x' for r in ratios)})" if len(ratios) > 1 else ""
    print(
        f"{what}, {args.epochs} epochs, 1 thread, {'PostgreSQL' if args.storage else 'SQLite'}, "
        f"{args.rounds} round(s)): "
        f"hpo worker --fuse {args.k} {fused:.0f} trials/h vs hpo worker {unfused:.0f} trials/h, "
        f"median ratio {statistics.median(ratios):.2f}x{spread}"
    )
    # CPU seconds of the whole worker (supervisor and trainer): less sensitive to other load
    cpu_ratio = statistics.median(cpu["unfused"]) / statistics.median(cpu["fused"])
    print(f"worker CPU time ratio (unfused / fused, medians): {cpu_ratio:.2f}x")


def one_worker(
    folder: Path,
    name: str,
    extra: list[str],
    args: argparse.Namespace,
    images: Path | None,
    env: dict[str, str],
) -> tuple[float, float]:
    """Create the study ``name`` in a new database under ``folder`` and run one worker on it:
    (trials per hour over the training span, the worker's CPU seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{folder / 'bench.db'}"
    label = name
    if args.storage:  # a shared database: a name of its own for each run
        name = f"bench_{name}_{uuid.uuid4().hex[:8]}"
    path = folder / f"{name}.yaml"
    if args.model == "r000-mlp":
        study = R000_STUDY.format(
            name=name, root=images, trials=args.trials, epochs=args.epochs, sampler=args.sampler
        )
    elif args.model == "r003-losses":
        study = R003_STUDY.format(
            name=name,
            root=images,
            size=args.image_size,
            trials=args.trials,
            epochs=args.epochs,
            sampler=args.sampler,
        )
    elif images is not None:
        study = CNN_STUDY.format(
            name=name,
            root=images,
            size=args.image_size,
            settings=CNN_SETTINGS[args.model],
            trials=args.trials,
            epochs=args.epochs,
            sampler=args.sampler,
        )
    elif args.model == "digits-grid":
        lrs = [round(1e-3 * 1.5**i, 6) for i in range(args.trials // 2)]
        study = GRID_STUDY.format(name=name, hidden=args.hidden, lrs=lrs, epochs=args.epochs)
    else:
        study = STUDY.format(
            name=name, hidden=args.hidden, trials=args.trials, epochs=args.epochs, sampler=args.sampler
        )
    path.write_text(study)
    hpo(["create-study", str(path), "--storage", url], env)
    worker = [
        "worker",
        "--study-name",
        name,
        "--storage",
        url,
        "--threads",
        "1",
        "--no-progress",
        "--checkpoint-dir",
        str(folder / f"ck_{name}"),
        *extra,
    ]
    wall, cpu = hpo(worker, env)
    count, seconds = span(url, name)
    rate = 3600 * count / seconds
    print(
        f"{label:8s} {count} trials in {seconds:.1f} s of training ({wall:.1f} s worker wall, "
        f"{cpu:.1f} CPU s with start-up): {rate:.0f} trials/h",
        flush=True,
    )
    return rate, cpu


if __name__ == "__main__":
    main()
