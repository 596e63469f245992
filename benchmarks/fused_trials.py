"""Trials per hour: K fused digits trials (``objectives._digits_fused``) against the same K trials
run one after another unfused (``objectives.digits.train``), in the same run, on the CPU.

The K trials are a learning-rate x weight-decay x StepLR grid of the quickstart's MLP (128 hidden
units, 2 layers, Adam, batch 64, the full digits data): what a grid or random study on one model
queues. Both sides do everything a worker's trial does: a real Optuna trial on an SQLite storage
reporting every epoch, the metric history, a checkpoint per trial per epoch. The two sides
alternate for several rounds (this machine is shared and noisy: compare only within a run) and
the ratio of median trials per hour is printed.

    nice python benchmarks/fused_trials.py [--k 8] [--epochs 10] [--rounds 3] [--threads 1]

``--r000-steps N`` (default 300; 0: skip) also times report 000's residual MLP (``attribute_mlp``:
39 CelebA attributes in, width 256, 11 layers, batch 16, AdamW, the study
``r000_celeba_attribute_mlp``) on synthetic data: N training steps (forward, backward, optimizer)
of K fused members (``objectives.vision._fused_mlp``) against K unfused models, alternating.
That is the model part only (the vision training loop is not fused yet), so it is printed as
steps per second, not trials per hour.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch

from hpo._fused import Stack
from hpo.objective import TrialRun
from hpo.spec import StudySpec, parse_study
from objectives._digits_fused import train_fused
from objectives.digits import train
from objectives.vision._fused_mlp import residual_mlp_forward
from objectives.vision.models import ModelOptions
from objectives.vision.models import build_model as build_vision_model

SETTINGS = {
    "hidden_units": 128,
    "hidden_layers": 2,
    "optimizer": "adam",
    "batch_size": 64,
    "scheduler": "step",
}


def grid(k: int) -> list[dict[str, Any]]:
    points = itertools.product([3e-3, 1e-3, 3e-4, 1e-2], [0.0, 1e-4], [(5, 0.5), (3, 0.7)])
    return [
        {"lr": lr, "weight_decay": wd, "step_size": step, "gamma": gamma}
        for lr, wd, (step, gamma) in itertools.islice(itertools.cycle(points), k)
    ]


def make_spec(epochs: int, hidden: int) -> StudySpec:
    raw = {
        "name": "fused_bench",
        "objective": "digits_mlp",
        "data": {"val_fraction": 0.2},
        "settings": {**SETTINGS, "hidden_units": hidden},
        "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 1000,
        "budget": {"max_epochs": epochs},
        "seed": 0,
        "sampler": "random",
    }
    return parse_study(raw, "benchmark")


def runs(study: optuna.Study, spec: StudySpec, configs: list[dict[str, Any]], folder: Path) -> list[TrialRun]:
    cache: dict[str, Any] = {}  # one worker: the data is decoded once and shared
    return [
        TrialRun(
            trial=study.ask(),
            spec=spec,
            params=params,
            max_epochs=spec.budget.max_epochs,
            device="cpu",
            checkpoint_dir=folder / f"t{i}",
            cache=cache,
        )
        for i, params in enumerate(configs)
    ]


def finish(study: optuna.Study, run: TrialRun, value: float) -> None:
    run.flush()
    study.tell(run.trial, value)


def unfused_round(study: optuna.Study, spec: StudySpec, configs: list[dict[str, Any]], folder: Path) -> float:
    start = time.perf_counter()
    for run in runs(study, spec, configs, folder):
        finish(study, run, train(run))
    return time.perf_counter() - start


def fused_round(study: optuna.Study, spec: StudySpec, configs: list[dict[str, Any]], folder: Path) -> float:
    start = time.perf_counter()
    for member in train_fused(runs(study, spec, configs, folder)):
        if member.value is None:
            raise RuntimeError(f"a member failed: {member.error!r}")
        finish(study, member.run, member.value)
    return time.perf_counter() - start


def r000_round(k: int, steps: int, fused: bool) -> float:
    """Seconds for ``steps`` training steps of ``k`` report 000 MLPs (fused or one by one)."""
    options = ModelOptions(name="attribute_mlp", num_outputs=1, mlp_width=256, mlp_layers=11, in_features=39)
    models, optimizers = [], []
    for i in range(k):
        torch.manual_seed(0)
        model = build_vision_model(options)
        models.append(model)
        lr, wd = 1e-3 * (1 + i), 1e-2 / (1 + i)
        optimizers.append(torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=wd))
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (steps, 16, 39), generator=generator).float()
    y = torch.randint(0, 2, (steps, 16, 1), generator=generator).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    start = time.perf_counter()
    if fused:
        stack = Stack(list(models), list(optimizers))
        for s in range(steps):
            logits = residual_mlp_forward(models[0], stack.params, stack.buffers, x[s], True)
            losses = bce(logits, y[s].expand(k, -1, -1), reduction="none").mean(dim=(1, 2))
            losses.sum().backward()
            stack.step()
        stack.write_back()
    else:
        for model, optimizer in zip(models, optimizers, strict=True):
            model.train()
            for s in range(steps):
                loss = bce(model(x[s]), y[s])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="trials per fused group (default 8)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--r000-steps", type=int, default=300, help="report 000 MLP steps (0: skip)")
    parser.add_argument("--skip-digits", action="store_true", help="only the report 000 MLP")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units (quickstart: 128)")
    parser.add_argument(
        "--storage",
        choices=["sqlite", "memory"],
        default="sqlite",
        help="sqlite: a worker's storage, every report committed; memory: training cost alone",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    if not args.skip_digits:
        digits_benchmark(args)
    if args.r000_steps > 0:
        r000_benchmark(args)


def digits_benchmark(args: argparse.Namespace) -> None:
    spec = make_spec(args.epochs, args.hidden)
    configs = grid(args.k)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        storage = f"sqlite:///{root / 'bench.db'}" if args.storage == "sqlite" else None
        study = optuna.create_study(
            study_name="fused_bench", storage=storage, pruner=optuna.pruners.NopPruner()
        )
        fused_round(study, spec, configs, root / "warm")  # imports, data decode, first allocations
        unfused_s: list[float] = []
        fused_s: list[float] = []
        cpu = {"unfused": 0.0, "fused": 0.0}
        for r in range(args.rounds):
            before = time.process_time()
            unfused_s.append(unfused_round(study, spec, configs, root / f"u{r}"))
            middle = time.process_time()
            fused_s.append(fused_round(study, spec, configs, root / f"f{r}"))
            cpu["unfused"] += middle - before
            cpu["fused"] += time.process_time() - middle
            print(
                f"round {r + 1}: unfused {unfused_s[-1]:.2f} s, fused {fused_s[-1]:.2f} s for {args.k} trials"
            )
    unfused_rate = 3600 * args.k / statistics.median(unfused_s)
    fused_rate = 3600 * args.k / statistics.median(fused_s)
    print(
        f"digits MLP ({args.hidden} hidden units), {args.epochs} epochs, {args.threads} thread(s), "
        f"{args.storage} storage: "
        f"unfused {unfused_rate:.0f} trials/h, fused K={args.k} {fused_rate:.0f} trials/h, "
        f"ratio {fused_rate / unfused_rate:.2f}x"
    )
    # this process's CPU seconds: less sensitive than wall time to other load on a shared machine
    print(f"CPU time ratio (unfused / fused): {cpu['unfused'] / cpu['fused']:.2f}x")


def r000_benchmark(args: argparse.Namespace) -> None:
    r000_round(args.k, 20, fused=True)  # warm-up
    unfused_r: list[float] = []
    fused_r: list[float] = []
    for _ in range(args.rounds):  # alternating, as above
        unfused_r.append(r000_round(args.k, args.r000_steps, fused=False))
        fused_r.append(r000_round(args.k, args.r000_steps, fused=True))
    rate_u = args.k * args.r000_steps / statistics.median(unfused_r)
    rate_f = args.k * args.r000_steps / statistics.median(fused_r)
    print(
        f"report 000 MLP (attribute_mlp, width 256, 11 layers, batch 16, AdamW), model part only: "
        f"unfused {rate_u:.0f} member-steps/s, fused K={args.k} {rate_f:.0f} member-steps/s, "
        f"ratio {rate_f / rate_u:.2f}x"
    )


if __name__ == "__main__":
    main()
