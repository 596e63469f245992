"""Small helpers that training loops share: seeding, checkpoints, optimizers and schedules."""

from __future__ import annotations

import contextlib
import copy
import glob
import os
import random
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")


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
    *,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over ``parameters`` (tensors, or param-group dicts).

    ``fused``: PyTorch's fused single-kernel implementation. ``None`` (the default) picks it when
    every parameter is a floating-point CUDA tensor, where it replaces a launch per parameter and
    step with one (launch-bound small-batch steps gain most); on the CPU the default stays the
    classic implementation, so CPU results are unchanged."""
    parameters = _materialise(parameters)
    if fused is None:
        fused = _all_cuda_float(parameters)
    extra: dict[str, Any] = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov and momentum > 0,
            **extra,
        )
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, **extra)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, **extra)
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


def _materialise(parameters: Any) -> Any:
    """A list of the tensors or groups (an iterator such as ``model.parameters()`` is read once)."""
    return parameters if isinstance(parameters, list) else list(parameters)


def _all_cuda_float(parameters: list[Any]) -> bool:
    tensors: list[torch.Tensor] = []
    for item in parameters:
        tensors.extend(item["params"] if isinstance(item, dict) else [item])
    return bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)


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


def checkpoint_due(epoch: int, max_epochs: int, every: int = 1) -> bool:
    """Whether epoch ``epoch`` (1-based) writes a checkpoint under ``checkpoint_every: every``.

    Every ``every``-th epoch and the budget's last one. (A loop also writes one when the trial ends
    early: early stopping or pruning.) A trial killed in between resumes from the previous
    checkpoint and replays the epochs after it with their own seeds (:func:`epoch_seed`), so the
    result is the uninterrupted run's; ``every`` trades checkpoint writes for replayed epochs."""
    if every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, not {every}")
    return epoch % every == 0 or epoch >= max_epochs


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
    state = checkpoint_state(
        model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, config=config, history=history
    )
    return _write_checkpoint(directory, state)


def checkpoint_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    epoch: int,
    config: dict[str, Any],
    history: dict[str, list[float]],
) -> dict[str, Any]:
    """What a checkpoint holds (its tensors are the live ones: see :func:`_snapshot`)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "config": config,
        "history": history,
    }


def _write_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    # A temporary file of this process's own: two trainers may write one trial's folder at once
    # (a paused worker's trainer training on after its lease went to the retry), and with one
    # shared name one's rename took the other's file away (FileNotFoundError failed the retry)
    # or both wrote into it. Each rename is atomic, so the checkpoint is always one writer's whole
    # file; the trial's epochs are seeded, so both write the same states.
    tmp = directory / _temporary_name()
    _remove_dead_writers_files(directory)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a write that failed (a full disk) leaves no partial file
    return path


_TMP_PREFIX = f".{CHECKPOINT_FILE}."


def _temporary_name() -> str:
    return f"{_TMP_PREFIX}{_host()}.{os.getpid()}.{threading.get_ident()}.tmp"


def _host() -> str:
    return os.uname().nodename.replace(".", "_") or "host"


def _remove_dead_writers_files(directory: Path) -> None:
    """Delete the temporary files of this host's writers that died mid-write (SIGKILL, out of
    memory): one each, up to the model's size. Other hosts' files are left alone (a checkpoint
    folder on a shared file system; their process numbers mean nothing here)."""
    prefix = f"{_TMP_PREFIX}{_host()}."
    for leftover in directory.glob(f"{glob.escape(prefix)}*.tmp"):
        pid_text = leftover.name[len(prefix) :].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _snapshot(obj: Any) -> Any:
    """A copy that training can no longer change: tensors copied to the CPU, containers rebuilt
    (a dict keeps its type and attributes, e.g. a state dict's ``_metadata``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = _snapshot(value)
        return out
    if isinstance(obj, list):
        return [_snapshot(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class CheckpointWriter:
    """Writes checkpoints like :func:`save_checkpoint`, optionally in a background thread.

    ``asynchronous=False`` is :func:`save_checkpoint`. With ``asynchronous=True``, :meth:`save`
    first waits for the previous write, takes a snapshot of the state (tensors copied to the host:
    a large model's write no longer holds up training, only the copy does) and writes it in a
    thread, to a temporary file renamed into place. At most one write is in flight. Leaving the
    ``with`` block waits for it, however the block ends (the trial's end, pruning, an error), so a
    finished trial's checkpoint is on disk. A process killed mid-write (SIGKILL) leaves the
    previous whole checkpoint, which a retry resumes from, replaying the epochs after it.
    """

    def __init__(self, asynchronous: bool = False) -> None:
        self.asynchronous = asynchronous
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, directory: Path, **state: Any) -> None:
        """``state``: :func:`checkpoint_state`'s keyword arguments."""
        self.save_all([(directory, state)])

    def save_all(self, checkpoints: Sequence[tuple[Path, Mapping[str, Any]]]) -> None:
        """Several checkpoints (a fused group's members'), each ``(directory, state)`` as for
        :meth:`save`, written one after the other (in one thread when asynchronous)."""
        self.wait()
        states = [(directory, checkpoint_state(**state)) for directory, state in checkpoints]
        if not self.asynchronous:
            for directory, state in states:
                _write_checkpoint(directory, state)
            return
        if not states:
            return
        snapshots = [(directory, _snapshot(state)) for directory, state in states]
        self._thread = threading.Thread(
            target=self._write, args=(snapshots,), name="checkpoint-writer", daemon=True
        )
        self._thread.start()

    def _write(self, snapshots: list[tuple[Path, dict[str, Any]]]) -> None:
        try:
            for directory, state in snapshots:
                _write_checkpoint(directory, state)
        except BaseException as exc:  # re-raised in the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.wait()
            return
        with contextlib.suppress(Exception):  # the exception under way is the one to report
            self.wait()


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
    # The implementation flags are this process's choice (fused on CUDA, classic on the CPU), not
    # the checkpoint's: a CUDA checkpoint resumed on the CPU must not bring ``fused`` with it.
    flags = [{k: g[k] for k in _IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, kept in zip(optimizer.param_groups, flags, strict=False):
        group.update(kept)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), dict(state["history"])
