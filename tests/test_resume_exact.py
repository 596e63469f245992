"""A retried trial resumed from its checkpoint ends exactly like the uninterrupted run (CPU).

Every objective that checkpoints is run three ways against a real Optuna study in an SQLite file,
as a worker runs trials (``TrialRun`` on ``study.ask()``):

* uninterrupted for N epochs;
* an attempt that crashes after epoch k: its ``on_epoch`` hook raises a ``BaseException`` (as a
  killed worker stops: no clean-up in the objective), so its last checkpoint is the one after
  epoch k - 1, written before the crash;
* the retry: a fresh ``TrialRun`` on a new trial with the same parameters and checkpoint folder.

The retry must report every epoch's metrics, the final value and the final weights equal to the
uninterrupted run's: not approximately, exactly (float equality).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from synthetic_data import make_imagefolder, make_tiny_imagenet

from hpo.objective import TrialRun
from hpo.spec import StudySpec, parse_study
from hpo.training import CHECKPOINT_FILE, epoch_seed
from objectives.digits import train as train_digits
from objectives.vision.train import train as train_vision

Train = Callable[[TrialRun], float]
PARAMS = {"lr": 0.03}


class WorkerKilled(BaseException):
    """What the crashed attempt dies of: not an Exception, so nothing in the objective catches it."""


@dataclass
class Outcome:
    value: float | None
    history: dict[str, list[float]]
    trial: optuna.trial.FrozenTrial
    weights: dict[str, torch.Tensor]
    checkpoint_epoch: int


def make_spec(
    objective: str, data: Mapping[str, Any], settings: Mapping[str, Any], epochs: int, seed: int = 7
) -> StudySpec:
    raw = {
        "name": "resume",
        "objective": objective,
        "data": dict(data),
        "settings": dict(settings),
        "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 3,
        "budget": {"max_epochs": epochs},
        "seed": seed,
        "sampler": "random",
    }
    return parse_study(raw, "test study")


def attempt(
    train: Train,
    spec: StudySpec,
    storage: str,
    checkpoint_dir: Path,
    *,
    epochs: int,
    crash_after: int | None = None,
) -> Outcome:
    """One attempt of the trial on a new trial of the SQLite study; ``crash_after``: die there."""
    study = optuna.create_study(
        study_name="resume", storage=storage, pruner=optuna.pruners.NopPruner(), load_if_exists=True
    )

    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        if crash_after is not None and epoch == crash_after:
            raise WorkerKilled(f"killed after epoch {epoch}")

    run = TrialRun(
        trial=study.ask(),
        spec=spec,
        params=dict(PARAMS),
        max_epochs=epochs,
        device="cpu",
        checkpoint_dir=checkpoint_dir,
        cache={},  # a fresh worker process: nothing decoded yet
        on_epoch=on_epoch,
    )
    value: float | None = None
    if crash_after is None:
        value = train(run)
    else:
        with pytest.raises(WorkerKilled):
            train(run)
    run.flush()
    state = torch.load(checkpoint_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    frozen = study._storage.get_trial(run.trial._trial_id)
    return Outcome(value, run.history, frozen, state["model"], int(state["epoch"]))


def check_resume_is_exact(
    train: Train,
    spec: StudySpec,
    tmp_path: Path,
    *,
    epochs: int,
    crash_after: int,
    checkpoint_every: int = 1,
    retry_spec: StudySpec | None = None,
) -> None:
    """``checkpoint_every``: the crashed attempt's last checkpoint is the last multiple of it before
    epoch k, and the retry replays the epochs after it. ``retry_spec``: the retry's own spec."""
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    whole = attempt(train, spec, storage, tmp_path / "whole", epochs=epochs)
    crashed = attempt(train, spec, storage, tmp_path / "trial", epochs=epochs, crash_after=crash_after)
    resumed_from = (crash_after - 1) // checkpoint_every * checkpoint_every
    assert crashed.checkpoint_epoch == resumed_from  # the crash came before epoch k's checkpoint
    assert len(crashed.history["val_loss"]) == crash_after
    retry = attempt(train, retry_spec or spec, storage, tmp_path / "trial", epochs=epochs)

    assert retry.trial.user_attrs["resumed_from_epoch"] == resumed_from
    assert retry.checkpoint_epoch == whole.checkpoint_epoch == epochs
    assert set(retry.history) == set(whole.history)
    for name, values in whole.history.items():
        assert len(values) == epochs
        assert retry.history[name] == values, name  # every epoch, float equality
    assert retry.value == whole.value
    assert retry.trial.intermediate_values == whole.trial.intermediate_values
    assert retry.weights.keys() == whole.weights.keys()
    for key, tensor in whole.weights.items():
        assert torch.equal(retry.weights[key], tensor), key


DIGITS = {"hidden_units": 32, "hidden_layers": 2, "batch_size": 32}
DIGITS_DATA = {"val_fraction": 0.2, "subset": 0.3}


@pytest.mark.parametrize(
    ("settings", "crash_after"),
    [
        # the quickstart's shape (Adam, StepLR), crashed mid-schedule
        ({**DIGITS, "optimizer": "adam", "scheduler": "step", "step_size": 2}, 4),
        # dropout masks and SGD momentum buffers, crashed in the second epoch
        (
            {
                **DIGITS,
                "optimizer": "sgd",
                "momentum": 0.9,
                "dropout": 0.2,
                "scheduler": "step",
                "step_size": 2,
            },
            2,
        ),
        # a schedule that depends on the epoch budget
        ({**DIGITS, "optimizer": "adamw", "weight_decay": 1e-3, "dropout": 0.3, "scheduler": "cosine"}, 5),
    ],
    ids=["adam-step", "sgd-dropout", "adamw-cosine"],
)
def test_digits_resume_is_exact(settings: dict[str, Any], crash_after: int, tmp_path: Path) -> None:
    spec = make_spec("digits_mlp", DIGITS_DATA, settings, epochs=6)
    check_resume_is_exact(train_digits, spec, tmp_path, epochs=6, crash_after=crash_after)


def test_digits_does_not_resume_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    """A checkpoint is only resumed by the run that wrote it: same config, data, seed (and budget
    when the schedule depends on it); anything else starts from epoch 1."""
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    settings = {**DIGITS, "scheduler": "cosine"}
    spec = make_spec("digits_mlp", DIGITS_DATA, settings, epochs=3)
    attempt(train_digits, spec, storage, tmp_path / "trial", epochs=3, crash_after=3)
    others = [
        (make_spec("digits_mlp", DIGITS_DATA, settings, epochs=3, seed=8), 3),
        (make_spec("digits_mlp", {**DIGITS_DATA, "subset": 0.4}, settings, epochs=3), 3),
        (make_spec("digits_mlp", DIGITS_DATA, settings, epochs=4), 4),  # cosine's T_max changed
    ]
    for other, epochs in others:
        outcome = attempt(train_digits, other, storage, tmp_path / "trial", epochs=epochs, crash_after=1)
        assert "resumed_from_epoch" not in outcome.trial.user_attrs
        # the crashed attempt died at epoch 1 before checkpointing: the old checkpoint is still
        # there, so the next candidate is checked against the original, not this one
        assert outcome.checkpoint_epoch == 2


def test_epoch_seeds_do_not_depend_on_resumption() -> None:
    seeds = [epoch_seed(7, epoch) for epoch in range(1, 6)]
    assert len(set(seeds)) == 5
    assert seeds == [epoch_seed(7, epoch) for epoch in range(1, 6)]
    assert epoch_seed(8, 1) not in seeds


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("colours"), classes=5, per_class=10, size=16)


MLP = {"model": "mlp", "mlp_width": 32, "mlp_layers": 2, "batch_size": 16}


@pytest.mark.parametrize(
    ("settings", "epochs", "crash_after"),
    [
        # dropout, every augmentation, SGD momentum, a cosine schedule over the budget
        (
            {
                **MLP,
                "optimizer": "sgd",
                "momentum": 0.9,
                "nesterov": True,
                "dropout": 0.2,
                "scheduler": "cosine",
                "augment": "flip_jitter_rotation",
            },
            4,
            3,
        ),
        # batch-norm statistics (ResNet-18 from scratch), Adam moments, StepLR
        (
            {
                "model": "resnet18",
                "batch_size": 24,
                "optimizer": "adam",
                "scheduler": "step",
                "step_size": 1,
                "gamma": 0.7,
                "augment": "flip_rotation",
            },
            3,
            2,
        ),
    ],
    ids=["mlp-augment-dropout-cosine", "resnet18-batchnorm-adam"],
)
def test_vision_resume_is_exact(
    colours: Path, settings: dict[str, Any], epochs: int, crash_after: int, tmp_path: Path
) -> None:
    data = {"format": "imagefolder", "root": str(colours), "image_size": 16, "val_fraction": 0.3}
    spec = make_spec("image_classifier", data, settings, epochs=epochs)
    check_resume_is_exact(train_vision, spec, tmp_path, epochs=epochs, crash_after=crash_after)


def test_vision_center_loss_resume_is_exact(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny", classes=4, train_per_class=6, val_per_class=2, size=16)
    data = {"format": "tiny_imagenet", "root": str(root), "image_size": 16}
    settings = {**MLP, "optimizer": "sgd", "loss": "center", "center_loss_lambda": 0.5, "dropout": 0.1}
    spec = make_spec("image_classifier", data, settings, epochs=3)
    check_resume_is_exact(train_vision, spec, tmp_path, epochs=3, crash_after=2)


def test_vision_triplet_greyscale_resume_is_exact(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny", classes=4, train_per_class=6, val_per_class=2, size=16)
    data = {"format": "tiny_imagenet", "root": str(root), "image_size": 16, "channels": 1}
    settings = {**MLP, "optimizer": "sgd", "loss": "triplet", "triplet_margin": 0.5, "dropout": 0.1}
    spec = make_spec("image_classifier", data, settings, epochs=3)
    check_resume_is_exact(train_vision, spec, tmp_path, epochs=3, crash_after=2)


@pytest.mark.parametrize("async_write", [False, True], ids=["sync", "async"])
def test_vision_resume_with_checkpoint_every_replays_the_epochs_since_the_last_checkpoint(
    colours: Path, tmp_path: Path, async_write: bool
) -> None:
    """checkpoint_every: 3, killed after epoch 5: the checkpoint is epoch 3's, the retry replays
    epochs 4 and 5 with their own seeds (dropout, augmentation, SGD momentum) and ends exactly as
    the uninterrupted run. The retry checkpoints every epoch, synchronously: when and how to save is
    not part of the run. (A SIGKILL during an asynchronous write: test_checkpoint_every.py.)"""
    data = {"format": "imagefolder", "root": str(colours), "image_size": 16, "val_fraction": 0.3}
    settings = {
        **MLP,
        "optimizer": "sgd",
        "momentum": 0.9,
        "dropout": 0.2,
        "scheduler": "step",
        "step_size": 2,
        "augment": "flip_jitter",
    }
    spec = make_spec(
        "image_classifier",
        data,
        {**settings, "checkpoint_every": 3, "checkpoint_async": async_write},
        epochs=7,
    )
    retry_spec = make_spec("image_classifier", data, settings, epochs=7)
    check_resume_is_exact(
        train_vision, spec, tmp_path, epochs=7, crash_after=5, checkpoint_every=3, retry_spec=retry_spec
    )
