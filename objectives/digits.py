"""Quickstart objective: a small PyTorch MLP on scikit-learn's handwritten digits.

The data (1,797 8x8 images, 10 classes) ships with scikit-learn: nothing is downloaded. The
searched options follow the reports: optimizer, learning rate, batch size, weight decay, and a
StepLR schedule (step_size, gamma); momentum applies to SGD.

Each epoch's data order and dropout masks come from a seed derived from (study seed, epoch)
(:func:`hpo.training.seed_epoch`), so a trial resumed from its checkpoint after epoch ``k``
continues exactly as the uninterrupted run did: same metrics, same final value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hpo.objective import Objective, TrialRun
from hpo.training import (
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    save_checkpoint,
    seed_epoch,
    seed_everything,
)


class DigitsConfig(BaseModel):
    """Every option can be fixed under ``settings:`` or searched in the search space."""

    model_config = ConfigDict(extra="forbid")

    hidden_units: int = Field(default=64, ge=4, le=1024)
    hidden_layers: int = Field(default=2, ge=1, le=8)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0.0)
    batch_size: int = Field(default=64, ge=1, le=2048)
    scheduler: Literal["none", "step", "exponential", "cosine"] = "step"
    step_size: int = Field(default=5, ge=1)
    gamma: float = Field(default=0.5, gt=0.0, le=1.0)


class DigitsData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    subset: float = Field(default=1.0, gt=0.0, le=1.0)


def load_data(data: DigitsData, seed: int) -> dict[str, torch.Tensor]:
    """Stratified train/validation split of the digits, features scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    indices = torch.arange(len(y)).numpy()
    if data.subset < 1.0:
        indices, _ = train_test_split(indices, train_size=data.subset, stratify=y.numpy(), random_state=seed)
    train_idx, val_idx = train_test_split(
        indices, test_size=data.val_fraction, stratify=y.numpy()[indices], random_state=seed
    )
    return {"x_train": x[train_idx], "y_train": y[train_idx], "x_val": x[val_idx], "y_val": y[val_idx]}


def build_model(cfg: DigitsConfig, n_features: int = 64, n_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    width = n_features
    for _ in range(cfg.hidden_layers):
        layers += [nn.Linear(width, cfg.hidden_units), nn.ReLU()]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width = cfg.hidden_units
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    model.train()
    order = torch.randperm(len(y), generator=generator)
    total = torch.zeros(())
    for start in range(0, len(y), batch_size):
        batch = order[start : start + batch_size]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(batch)
    return float(total) / len(y)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = model(x)
    return {
        "val_loss": float(F.cross_entropy(logits, y)),
        "val_acc": float((logits.argmax(1) == y).float().mean()),
    }


@dataclass
class DigitsTrial:
    """One trial's state before its first epoch: what :func:`train` and the fused trainer
    (``objectives._digits_fused``) both start from, so a fused member starts as the unfused trial."""

    cfg: DigitsConfig
    data: dict[str, torch.Tensor]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    identity: dict[str, Any]
    start_epoch: int


def prepare(run: TrialRun) -> DigitsTrial:
    """Data, seeded model, optimizer and schedule, restored from the trial's checkpoint if any."""
    cfg = DigitsConfig(**run.config)
    data_cfg = DigitsData(**run.data)
    key = f"digits:{data_cfg.model_dump_json()}:{run.seed}"
    if key not in run.cache:  # decoded once per worker, reused by every trial it runs
        run.cache[key] = load_data(data_cfg, run.seed)
    data = {name: tensor.to(run.device) for name, tensor in run.cache[key].items()}

    seed_everything(run.seed)  # the initial weights
    model = build_model(cfg).to(run.device)
    optimizer = build_optimizer(
        cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov
    )
    scheduler = build_scheduler(
        cfg.scheduler, optimizer, step_size=cfg.step_size, gamma=cfg.gamma, epochs=run.max_epochs
    )

    # A checkpoint is resumed only by the same configuration, data and seed (and epoch budget,
    # where the schedule depends on it).
    identity: dict[str, Any] = {"config": cfg.model_dump(), "data": data_cfg.model_dump(), "seed": run.seed}
    if cfg.scheduler == "cosine":
        identity["max_epochs"] = run.max_epochs
    start_epoch = 1
    restored = load_checkpoint(
        run.checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler, config=identity
    )
    if restored is not None:
        start_epoch = run.resume(restored[1]) + 1
    return DigitsTrial(cfg, data, model, optimizer, scheduler, identity, start_epoch)


def train(run: TrialRun) -> float:
    trial = prepare(run)
    cfg, data, model, optimizer = trial.cfg, trial.data, trial.model, trial.optimizer
    scheduler, identity, start_epoch = trial.scheduler, trial.identity, trial.start_epoch

    for epoch in range(start_epoch, run.max_epochs + 1):
        generator = seed_epoch(run.seed, epoch)  # data order and dropout: the same when resumed
        train_loss = train_one_epoch(
            model, optimizer, data["x_train"], data["y_train"], cfg.batch_size, generator
        )
        if scheduler is not None:
            scheduler.step()
        metrics = {"train_loss": train_loss, **evaluate(model, data["x_val"], data["y_val"])}
        stop = run.report(epoch, metrics)
        save_checkpoint(
            run.checkpoint_dir,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            config=identity,
            history=run.history,
        )
        if stop:
            break
    return run.final_value()


# Fused trials (hpo worker --fuse K): what may differ between the members of one fused group, the
# optimizer's and the schedule's hyperparameters. Everything else (architecture, dropout,
# optimizer kind, Nesterov, batch size), the data and the seed must be equal: they decide the
# batches, the dropout masks and the shapes.
MAY_DIFFER = frozenset({"lr", "weight_decay", "momentum", "scheduler", "step_size", "gamma"})


def _train_fused(runs: Sequence[TrialRun], on_leave: Callable[[Any], None]) -> Sequence[Any]:
    from objectives._digits_fused import train_fused  # imports this module: loaded on first use

    return train_fused(runs, on_leave)


def _why_not_fusable(config: Mapping[str, Any], device: str) -> str | None:
    if config.get("dropout", 0.0) > 0 and not device.startswith("cpu"):
        return "fused dropout matches the unfused masks on the CPU only"
    return None


DIGITS_MLP = Objective(
    train=train,
    config=DigitsConfig,
    data=DigitsData,
    description="MLP on scikit-learn's handwritten digits (no download)",
    metrics=("val_loss", "val_acc", "train_loss"),
    fused_train=_train_fused,
    may_differ=MAY_DIFFER,
    why_not_fusable=_why_not_fusable,
)
