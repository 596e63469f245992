"""Small helpers that training loops share: seeding, checkpoints, optimizers and schedules."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness (data order, dropout, augmentation).

    It depends only on the trial's seed and the epoch's number, never on how many epochs this
    process has trained: a trial resumed from its checkpoint after epoch ``k`` draws exactly what
    the uninterrupted run drew from epoch ``k + 1`` on, so no generator state has to be saved.
    """
    return (seed * 1_000_003 + epoch) % 2**63


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed Python, NumPy and torch (dropout masks) for epoch ``epoch``; returns its data-order generator.

    Call it at the start of every epoch, resumed or not (see :func:`epoch_seed`).
    """
    return seed_everything(epoch_seed(seed, epoch))


def build_optimizer(
    name: str,
    parameters: Any,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov and momentum > 0,
        )
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, step_size: int = 10, gamma: float = 0.1, epochs: int = 1
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch learning-rate schedule (``scheduler.step()`` once after each epoch)."""
    if name == "none":
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    raise ValueError(f"unknown scheduler {name!r}; use none, step, exponential or cosine")


def save_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    epoch: int,
    config: dict[str, Any],
    history: dict[str, list[float]],
) -> Path:
    """Write model, optimizer, scheduler, epoch, config and metric history atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch,
            "config": config,
            "history": history,
        },
        tmp,
    )
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint
    return path


def load_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    config: dict[str, Any],
) -> tuple[int, dict[str, list[float]]] | None:
    """Restore the latest checkpoint if it was written for the same config; (epoch, history)."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != config:
        return None  # a different configuration: start from scratch rather than mix runs
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), dict(state["history"])
