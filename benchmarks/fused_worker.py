"""Trials per hour of ``hpo worker --fuse K`` against ``hpo worker``, on the digits quickstart MLP
or (``--model resnet18``) a tiny ResNet-18 ``image_classifier`` study.

Both workers are real CLI processes on their own SQLite study (same file, same trials: a random
search over the learning rate, weight decay and StepLR schedule, which all fuse), run one after
the other in this run, each with one thread (``--threads 1``, ``OMP_NUM_THREADS=1``). The rate is
counted over the study's training span (first trial started to last trial finished, from the
trials' own timestamps), so process start-up, the same for both, does not dilute it; the
workers' whole wall times are printed too.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fused_worker.py --k 8 --trials 16
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/fused_worker.py --model resnet18 --k 4 --trials 8

``--model resnet18``: SGD (momentum 0.9), ``transfer: scratch``, batch 16, on a synthetic
ImageFolder tree (``tests/support/synthetic_data.py``: 4 classes x 16 solid-colour images,
``--image-size`` px, a quarter held out), fused by ``objectives/vision/_fused_cnn.py``. Report
000's MLP is not measured here; the model part alone is measured by ``benchmarks/fused_trials.py``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
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
sampler: random
"""


CNN_STUDY = """
name: {name}
objective: image_classifier
data: {{format: imagefolder, root: {root}, image_size: {size}, val_fraction: 0.25}}
settings: {{model: resnet18, optimizer: sgd, batch_size: 16, scheduler: step}}
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
sampler: random
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="trials per fused group (default 8)")
    parser.add_argument("--trials", type=int, default=16, help="trials per study (default 16)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128, help="hidden units (quickstart: 128)")
    parser.add_argument("--model", choices=["digits", "resnet18"], default="digits")
    parser.add_argument("--image-size", type=int, default=32, help="resnet18: image size (default 32)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    env.pop("OPTUNA_STORAGE", None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 'bench.db'}"
        rates, cpu = {}, {}
        if args.model == "resnet18":
            sys.path.insert(0, str(ROOT / "tests" / "support"))
            from synthetic_data import make_imagefolder

            images = make_imagefolder(folder / "images", classes=4, per_class=16, size=args.image_size)
        for name, extra in (("unfused", []), ("fused", ["--fuse", str(args.k)])):
            path = folder / f"{name}.yaml"
            if args.model == "resnet18":
                study = CNN_STUDY.format(
                    name=name, root=images, size=args.image_size, trials=args.trials, epochs=args.epochs
                )
            else:
                study = STUDY.format(name=name, hidden=args.hidden, trials=args.trials, epochs=args.epochs)
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
            wall, cpu[name] = hpo(worker, env)
            count, seconds = span(url, name)
            rates[name] = 3600 * count / seconds
            print(
                f"{name:8s} {count} trials in {seconds:.1f} s of training ({wall:.1f} s worker wall, "
                f"{cpu[name]:.1f} CPU s with start-up): {rates[name]:.0f} trials/h"
            )
    what = (
        f"resnet18 ({args.image_size} px, 48 training images, batch 16"
        if args.model == "resnet18"
        else f"digits MLP ({args.hidden} hidden units"
    )
    print(
        f"{what}, {args.epochs} epochs, 1 thread, SQLite): "
        f"hpo worker --fuse {args.k} {rates['fused']:.0f} trials/h vs hpo worker {rates['unfused']:.0f} "
        f"trials/h, ratio {rates['fused'] / rates['unfused']:.2f}x"
    )
    # CPU seconds of the whole worker (supervisor and trainer): less sensitive to other load
    print(f"worker CPU time ratio (unfused / fused): {cpu['unfused'] / cpu['fused']:.2f}x")


if __name__ == "__main__":
    main()
