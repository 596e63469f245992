"""The frozen-feature cache (``feature_cache: auto``) of the image_classifier objective, on the CPU.

Trials run through the real ``train`` with a real Optuna trial and ``TrialRun``, as a worker runs
them; the models are the real torchvision AlexNet and report 000's ResNet-18 encoder + MLP with
random weights (nothing can be downloaded), on tiny synthetic images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from conftest import run_cli
from synthetic_data import make_imagefolder
from torch import nn

from hpo.objective import TrialRun
from hpo.spec import parse_study
from hpo.training import CHECKPOINT_FILE
from objectives.vision import features
from objectives.vision.models import ModelOptions, build_model
from objectives.vision.train import train

ALEXNET = {
    "model": "alexnet",
    "transfer": "features",
    "pretrained": False,
    "dropout": 0.2,
    "optimizer": "sgd",
    "momentum": 0.0,  # report 004's 0.9 would double the 230 MB checkpoint written every epoch
    "batch_size": 12,
    "eval_batch_size": 16,
}
# ResNet-18 with only the new last layer trained: much cheaper than AlexNet (54M trainable weights).
RESNET = {
    "model": "resnet18",
    "transfer": "features",
    "pretrained": False,
    "frozen_mode": "eval",
    "dropout": 0.2,
    "batch_size": 12,
    "eval_batch_size": 16,
}
# Report 000, 2.3: frozen ResNet-18 encoder + the residual MLP, ExponentialLR. SGD, not the report's
# AdamW: the MLP's Linear biases feed batch norm, so their true gradient is 0 and what they get is
# rounding noise, which Adam scales to full-size steps; these then move the batch-norm running means,
# and evaluation would amplify a last-bit difference in the features (a convolution's result
# depends on its batch size) to ~1%. SGD keeps rounding noise at rounding size.
ENCODER_MLP = {
    "model": "resnet18_mlp",
    "transfer": "features",
    "pretrained": False,
    "frozen_mode": "eval",
    "mlp_width": 32,
    "mlp_layers": 3,
    "optimizer": "sgd",
    "momentum": 0.9,
    "scheduler": "exponential",
    "gamma": 0.9,
    "batch_size": 12,
    "eval_batch_size": 16,
}


def make_run(
    checkpoint_dir: Path,
    data: dict[str, Any],
    settings: dict[str, Any],
    cache: dict[str, Any],
    lr: float = 1e-2,
    epochs: int = 2,
) -> TrialRun:
    raw = {
        "name": "t",
        "objective": "image_classifier",
        "data": data,
        "settings": settings,
        "search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 1,
        "budget": {"max_epochs": epochs},
        "seed": 5,
        "sampler": "random",
    }
    return TrialRun(
        trial=optuna.create_study().ask(),
        spec=parse_study(raw, "test study"),
        params={"lr": lr},
        max_epochs=epochs,
        device="cpu",
        checkpoint_dir=checkpoint_dir,
        cache=cache,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = make_imagefolder(tmp_path_factory.mktemp("images"), classes=4, per_class=6, size=64)
    # 24 images: 18 train (batches of 12 and 6), 6 validation. AlexNet needs 64 px, the rest 32.
    return {"format": "imagefolder", "root": str(root), "image_size": 64, "val_fraction": 0.25}


@pytest.fixture(scope="module")
def small(images: dict[str, Any]) -> dict[str, Any]:
    return {**images, "image_size": 32}


def feature_entries(cache: dict[str, Any]) -> list[str]:
    return [k for k in cache if k.startswith("objectives.vision.features:") and not k.endswith(":said")]


def run_both(
    tmp_path: Path, data: dict[str, Any], settings: dict[str, Any]
) -> tuple[TrialRun, TrialRun, dict[str, Any]]:
    """The same trial recomputing (``feature_cache: off``) and with the cache, each with its own worker cache."""
    off = make_run(tmp_path / "off", data, {**settings, "feature_cache": "off"}, {})
    cache: dict[str, Any] = {}
    on = make_run(tmp_path / "on", data, settings, cache)
    train(off)
    train(on)
    return off, on, cache


def assert_same_curves(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), name


def assert_same_weights(a: Path, b: Path) -> None:
    first = torch.load(a / CHECKPOINT_FILE, weights_only=True)["model"]
    second = torch.load(b / CHECKPOINT_FILE, weights_only=True)["model"]
    assert first.keys() == second.keys()  # the whole model is saved either way (resume, retrain)
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-5, msg=key)


def test_alexnet_frozen_convolutions_cached_equal_recomputed(images: dict[str, Any], tmp_path: Path) -> None:
    off, on, cache = run_both(tmp_path, images, ALEXNET)
    assert feature_entries(cache), "the cache was not used"
    entry = cache[feature_entries(cache)[0]]
    assert tuple(entry.train.shape) == (18, 256 * 6 * 6)  # AlexNet: features, avgpool(6x6), flatten
    assert tuple(entry.val.shape) == (6, 256 * 6 * 6)
    assert_same_curves(off.history, on.history)
    assert off.history["train_loss"][1] != off.history["train_loss"][0]  # it trained
    assert_same_weights(tmp_path / "off", tmp_path / "on")


def test_encoder_mlp_cached_equal_recomputed(small: dict[str, Any], tmp_path: Path) -> None:
    off, on, cache = run_both(tmp_path, small, ENCODER_MLP)
    (key,) = feature_entries(cache)
    assert tuple(cache[key].train.shape) == (18, 512)  # ImageNet-style ResNet-18 features
    assert_same_curves(off.history, on.history)
    assert_same_weights(tmp_path / "off", tmp_path / "on")


def test_saved_encoder_checkpoint_mlp_cached_equal_recomputed(small: dict[str, Any], tmp_path: Path) -> None:
    # Report 000's own shape: a saved resnet18 image classifier (40 outputs) is the frozen encoder.
    encoder = build_model(ModelOptions(name="resnet18", num_outputs=40, dropout=0.3))
    path = tmp_path / "model.pt"
    torch.save({"model": encoder.state_dict(), "config": {"model": "resnet18", "dropout": 0.3}}, path)
    settings = {**ENCODER_MLP, "pretrained": None, "encoder_checkpoint": str(path)}
    off, on, cache = run_both(tmp_path, small, settings)
    (key,) = feature_entries(cache)
    assert tuple(cache[key].train.shape) == (18, 40)
    assert_same_curves(off.history, on.history)


def test_augmentation_is_refused_with_a_reason_once(
    small: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache: dict[str, Any] = {}
    settings = {**RESNET, "augment": "flip_jitter"}
    with caplog.at_level(logging.WARNING, logger="objectives.vision.features"):
        train(make_run(tmp_path / "a", small, settings, cache, epochs=1))
        train(make_run(tmp_path / "b", small, settings, cache, lr=1e-3, epochs=1))
    said = [r.getMessage() for r in caplog.records if "frozen-feature cache not used" in r.getMessage()]
    assert len(said) == 1  # once per worker, not once per trial
    assert "augmentation changes the images every epoch" in said[0] and "augment: none" in said[0]
    assert not feature_entries(cache)


def test_batch_norm_in_training_mode_is_refused_with_a_reason(
    small: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # frozen_mode: train (the reports' default): the frozen encoder's batch norm uses batch statistics.
    cache: dict[str, Any] = {}
    settings = {**ENCODER_MLP, "frozen_mode": "train"}
    with caplog.at_level(logging.WARNING, logger="objectives.vision.features"):
        train(make_run(tmp_path, small, settings, cache, epochs=1))
    (said,) = [r.getMessage() for r in caplog.records if "frozen-feature cache not used" in r.getMessage()]
    assert "bn1 (BatchNorm2d) normalises with batch statistics" in said
    assert "frozen_mode: eval may enable the cache" in said
    assert not feature_entries(cache)


def test_features_computed_once_per_worker_and_replaced_for_other_weights(
    small: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, ...]] = []
    real: Callable[..., torch.Tensor] = features.compute_features

    def counting(prefix: nn.Module, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append(tuple(images.shape))
        return real(prefix, images, **kwargs)

    monkeypatch.setattr(features, "compute_features", counting)
    cache: dict[str, Any] = {}  # one worker's cache, shared by its trials
    train(make_run(tmp_path / "1", small, RESNET, cache, epochs=1))
    assert calls == [(18, 3, 32, 32), (6, 3, 32, 32)]  # train and validation features
    (key,) = feature_entries(cache)
    first = cache[key]
    train(make_run(tmp_path / "2", small, {**RESNET, "dropout": 0.5}, cache, lr=5e-3, epochs=2))
    # The encoder + MLP model's encoder is the same ResNet-18 with the same weights: same features.
    train(make_run(tmp_path / "3", small, ENCODER_MLP, cache, epochs=1))
    assert len(calls) == 2  # the later trials reused them
    assert cache[key] is first
    # Other frozen weights (here EfficientNet-B0) on the same data replace the entry: one per dataset.
    train(make_run(tmp_path / "4", small, {**RESNET, "model": "efficientnet_b0"}, cache, epochs=1))
    assert len(calls) == 4
    assert feature_entries(cache) == [key] and tuple(cache[key].train.shape) == (18, 1280)


def test_checks_of_the_frozen_part() -> None:
    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn_like(x)

    class NoisyBlock(nn.Module):  # a container whose own forward is random
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(x + torch.randn_like(x))

    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    assert features.nondeterminism(conv) is None
    assert "cannot check" in str(features.nondeterminism(nn.Sequential(conv, NoisyBlock())))
    assert "does not know" in str(features.nondeterminism(nn.Sequential(conv, Noisy())))
    dropout = nn.Sequential(conv, nn.Dropout(0.5))
    assert "drops units" in str(features.nondeterminism(dropout))
    assert features.nondeterminism(dropout.eval()) is None
    norm = nn.Sequential(conv, nn.BatchNorm2d(4))
    assert "batch statistics" in str(features.nondeterminism(norm))
    assert features.nondeterminism(norm.eval()) is None
    assert "batch statistics" in str(
        features.nondeterminism(nn.BatchNorm2d(4, track_running_stats=False).eval())
    )


def test_recomputed_checkpoint_resumes_with_the_cache(small: dict[str, Any], tmp_path: Path) -> None:
    # feature_cache is not part of a checkpoint's identity: either way may resume the other.
    whole = make_run(tmp_path / "whole", small, RESNET, {}, epochs=2)
    train(whole)
    train(make_run(tmp_path / "retry", small, {**RESNET, "feature_cache": "off"}, {}, epochs=1))
    cache: dict[str, Any] = {}
    retry = make_run(tmp_path / "retry", small, RESNET, cache, epochs=2)
    train(retry)
    assert retry.trial.study._storage.get_trial(retry.trial._trial_id).user_attrs["resumed_from_epoch"] == 1
    assert feature_entries(cache)
    assert_same_curves(whole.history, retry.history)


@pytest.mark.slow
def test_worker_says_once_why_augmented_trials_recompute(
    small: dict[str, Any], tmp_path: Path, sqlite_url: str
) -> None:
    # Through ``hpo worker``, as a user runs it: two augmented trials in one worker, whose output
    # says once why they recompute.
    body = {
        "name": "feature_cache",
        "objective": "image_classifier",
        "data": small,
        "settings": {**RESNET, "augment": "flip_jitter"},
        "search_space": {
            "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True, "grid": [1e-3, 1e-2]},
        },
        "metric": "val_loss",
        "direction": "minimize",
        "budget": {"max_epochs": 1},
        "sampler": "grid",
    }
    study = tmp_path / "feature_cache.yaml"
    study.write_text(yaml.safe_dump(body))
    result = run_cli(["worker", str(study), "--storage", sqlite_url, "--no-progress"])
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(study_name="feature_cache", storage=sqlite_url).get_trials()
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    output = result.stdout + result.stderr
    assert output.count("frozen-feature cache not used") == 1, output
    assert "augmentation changes the images every epoch" in output
