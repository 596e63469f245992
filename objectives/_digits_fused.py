"""Fused trials of the digits MLP: K configurations that differ only in optimizer and schedule
hyperparameters train as one batched model (see :mod:`hpo._fused`).

Each member is set up by :func:`objectives.digits.prepare`, exactly as the unfused trial
(seeded weights, its own optimizer and scheduler, its own checkpoint restored); each epoch
replays :func:`objectives.digits.train_one_epoch` and :func:`objectives.digits.evaluate` for all
members at once, so every member's metrics, checkpoints and value equal its unfused run's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hpo._fused import (
    Member,
    Stack,
    member_cross_entropy,
    sequential_forward,
    train_group,
    why_not_fusable_runs,
)
from hpo.objective import TrialRun
from hpo.training import seed_epoch
from objectives.digits import MAY_DIFFER, DigitsConfig, prepare

# What may differ between fused members (declared with the objective: objectives.digits).
DIGITS_MAY_DIFFER = MAY_DIFFER


def _reference(stack: Stack) -> nn.Sequential:
    model = stack.reference
    if not isinstance(model, nn.Sequential):
        raise TypeError("the digits model is an nn.Sequential")
    return model


def train_fused(runs: Sequence[TrialRun], on_leave: Callable[[Member], None] | None = None) -> list[Member]:
    """Train the trials of ``runs`` as one fused group; each returned member holds its trial's
    ``value`` or its ``error`` (``optuna.TrialPruned``, a NaN metric), as the unfused ``train``
    would have returned or raised it. ``on_leave(member)``: called as each member leaves."""
    reason = why_not_fusable_runs(
        runs, DIGITS_MAY_DIFFER, lambda run: DigitsConfig(**run.config).model_dump()
    )
    if reason is not None:
        raise ValueError(f"these digits trials cannot be fused: {reason}")
    trials = [prepare(run) for run in runs]
    members = [
        Member(run, t.model, t.optimizer, t.scheduler, t.identity, next_epoch=t.start_epoch)
        for run, t in zip(runs, trials, strict=True)
    ]
    data = trials[0].data  # equal for every member: same data settings, seed and device
    batch_size = trials[0].cfg.batch_size
    seed = runs[0].seed

    def train_epoch(stack: Stack, epoch: int) -> list[float]:
        model = _reference(stack)
        x, y = data["x_train"], data["y_train"]
        generator = seed_epoch(seed, epoch)  # the unfused epoch's data order and dropout masks
        order = torch.randperm(len(y), generator=generator)
        total = torch.zeros(stack.size)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            losses = member_cross_entropy(sequential_forward(model, stack.params, x[batch], True), y[batch])
            losses.sum().backward()  # each member's gradient is its own loss's
            stack.step()
            total += losses.detach() * len(batch)
        return [float(t) / len(y) for t in total]

    @torch.no_grad()
    def evaluate(stack: Stack) -> list[dict[str, float]]:
        logits = sequential_forward(_reference(stack), stack.params, data["x_val"], False)
        losses = member_cross_entropy(logits, data["y_val"])
        accuracy = (logits.argmax(-1) == data["y_val"]).float().mean(dim=1)
        return [
            {"val_loss": float(loss), "val_acc": float(acc)}
            for loss, acc in zip(losses, accuracy, strict=True)
        ]

    train_group(members, train_epoch, evaluate, on_leave)
    return members
