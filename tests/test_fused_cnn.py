"""Fused CNN trials (objectives/vision/_fused_cnn.py through _fused_mlp.train_fused): K torchvision
CNN trials that differ only in optimizer/schedule hyperparameters, trained as one group (the
members in turn on the shared batches, each on its own leaves of the stacked parameters), give
each trial the metrics, value and checkpoint of its unfused run (objectives.vision.train).

Tolerances. The ResNet-18 comparisons run the whole objective in float64 (the ``float64`` fixture
casts the built models and the input batches), where fused and unfused runs' weights, batch-norm
statistics and momentum buffers agree to 1e-9 absolute or 1e-7 relative (measured: weights ~1e-12
and momentum buffers ~1e-10 after two epochs at small weights; 1e-9 relative where a diverging
member's running variances reach ~5e3); the metrics to 1e-6 only, as the criterion computes the
loss from float32 logits (``logits.float()``, one float32 ulp measured). That checks the fused
logic (each member's batch norm, gradients, augmentation, schedule, metrics) to rounding, which a
float32 tolerance could not. In float32 the members agree to rounding, but batch norm over 6-8
samples at ResNet-18's 1x1 last stage amplifies it (measured after one epoch: weights 5e-6,
momentum buffers 5e-5 relative; after a second epoch train_loss differs by ~3e-3 and an
ill-conditioned val_loss by ~0.3), so the float32 ResNet-18 check (VOC, BCE) is one epoch at
TOL32. AlexNet (no batch norm: well conditioned) runs in float32 at TOL32; its dropout masks, if
they differed between fused and unfused runs, would move the losses by far more than that.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import cli_env, run_cli, write_study
from synthetic_data import make_caltech101, make_imagefolder, make_voc
from test_fused_trials import WorkerKilled, checkpoint, make_run

from hpo._fused import Stack
from hpo.spec import StudySpec, parse_study
from objectives.vision._fused_mlp import train_fused, why_not_fusable
from objectives.vision.train import ImageClassifierConfig
from objectives.vision.train import train as train_alone

TOL64 = 1e-9  # float64: weights, batch-norm statistics and optimizer state, absolute
METRIC_TOL64 = 1e-6  # float64 runs' metrics: the criterion computes the loss in float32 (logits.float())
RTOL64 = 1e-7  # relative (lr 0.05 with momentum 0.9 drives running variances to ~5e3: measured 1e-9)
TOL32 = 1e-4  # float32, one epoch (ResNet-18) or no batch norm (AlexNet); optimizer state relative 1e-3
# float32 optimizer state, absolute: a momentum buffer entry near zero sums rounding differences of
# every step (measured 1.8e-4 on one of AlexNet's 256 conv biases after two epochs, on an AMD EPYC
# without AVX-512; within 1e-4 on the machine the test was written on)
STATE_TOL32 = 1e-3
SGD_MEMBERS: list[dict[str, Any]] = [
    {"lr": 0.05, "momentum": 0.9, "scheduler": "step", "step_size": 1, "gamma": 0.5},
    {"lr": 0.01, "momentum": 0.5, "weight_decay": 1e-3, "scheduler": "exponential", "gamma": 0.9},
    {"lr": 0.02, "momentum": 0.0, "weight_decay": 1e-2},
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny batches run ~4x faster so on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """The objective in float64, fused and unfused alike (both build through
    ``train.build_trial_model``): models and input batches cast."""
    from objectives.vision import train as vision_train

    build, model_input = vision_train.build_model, vision_train._model_input
    monkeypatch.setattr(vision_train, "build_model", lambda options: build(options).double())
    monkeypatch.setattr(vision_train, "_model_input", lambda *a, **k: model_input(*a, **k).double())


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("colours"), classes=4, per_class=4, size=32)


def make_spec(data: Mapping[str, Any], settings: Mapping[str, Any], epochs: int, **extra: Any) -> StudySpec:
    raw = {
        "name": "fused_cnn",
        "objective": "image_classifier",
        "data": dict(data),
        "settings": {"optimizer": "sgd", "batch_size": 8, "eval_batch_size": 7, **settings},
        "search_space": {"lr": {"type": "float", "low": 1e-6, "high": 1.0, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 3,
        "budget": {"max_epochs": epochs},
        "seed": 3,
        "sampler": "random",
        **extra,
    }
    return parse_study(raw, "test study")


def alone_and_fused(
    spec: StudySpec,
    members: list[dict[str, Any]],
    tmp_path: Path,
    pruner: optuna.pruners.BasePruner | None = None,
) -> tuple[list[Any], list[Any]]:
    alone_study = optuna.create_study(pruner=pruner)
    alone = []
    for i, params in enumerate(members):
        run = make_run(alone_study, spec, params, tmp_path / f"alone{i}")
        with contextlib.suppress(optuna.TrialPruned):
            train_alone(run)
        alone.append(run)
    study = optuna.create_study(pruner=pruner)
    fused = train_fused([make_run(study, spec, p, tmp_path / f"fused{i}") for i, p in enumerate(members)])
    return alone, fused


def assert_equal_runs(
    member: Any, run: Any, folder: Path, reference: Path, metrics: set[str], tol: float = TOL64
) -> None:
    history = member.run.history
    assert set(history) == set(run.history) == metrics
    for name, values in run.history.items():
        assert history[name] == pytest.approx(values, abs=max(tol, METRIC_TOL64), rel=0), name
    if member.error is None:
        assert member.value == pytest.approx(run.final_value(), abs=max(tol, METRIC_TOL64), rel=0)
    left, right = checkpoint(folder), checkpoint(reference)
    assert left["epoch"] == right["epoch"] and left["config"] == right["config"]
    assert left["scheduler"] == right["scheduler"]
    assert left["model"].keys() == right["model"].keys()
    rtol = RTOL64 if tol == TOL64 else 0.0
    for key, tensor in left["model"].items():  # num_batches_tracked exactly, the rest to rounding
        torch.testing.assert_close(tensor, right["model"][key], atol=tol, rtol=rtol, msg=key)
    lo, ro = left["optimizer"], right["optimizer"]
    assert lo["param_groups"] == ro["param_groups"] and lo["state"].keys() == ro["state"].keys()
    for index, state in lo["state"].items():
        for name, value in state.items():
            rtol = RTOL64 if tol == TOL64 else 1e-3  # float32: gradients through batch norm, see above
            atol = tol if tol == TOL64 else STATE_TOL32
            torch.testing.assert_close(value, ro["state"][index][name], atol=atol, rtol=rtol)


# the frozen-feature cache's entries in a worker's cache (objectives.vision.features: f"{_KEY}:{data_key}")
FEATURES_ENTRY = "objectives.vision.features:{"
SINGLE_LABEL = {"train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr"}


@pytest.mark.usefixtures("float64")
def test_resnet18_fused_members_equal_their_unfused_runs(colours: Path, tmp_path: Path) -> None:
    # flip_jitter: one augmented batch shared by the members, as each unfused run draws it
    # 32 px: at 16 px ResNet-18's third stage is at 1x1 too, and batch norm over 6 near-identical
    # solid-colour samples there amplifies float64 rounding to ~1e-8 in two epochs
    data = {"format": "imagefolder", "root": str(colours), "image_size": 32, "val_fraction": 0.25}
    spec = make_spec(data, {"model": "resnet18", "augment": "flip_jitter", "batch_size": 6}, epochs=2)
    alone, fused = alone_and_fused(spec, SGD_MEMBERS, tmp_path)
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.epochs_trained == 2
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", SINGLE_LABEL)
    finals = [m.run.history["train_loss"][-1] for m in fused]
    assert len({round(v, 3) for v in finals}) == 3  # the members really differ


@pytest.mark.usefixtures("float64")
def test_pixel_mlp_fused_members_equal_their_unfused_runs(colours: Path, tmp_path: Path) -> None:
    # model: mlp, report 000's residual MLP on flattened (augmented) pixels: the attribute MLP's
    # fused forward pass (batch norm per member, one shared dropout mask) on image batches
    data = {"format": "imagefolder", "root": str(colours), "image_size": 8, "val_fraction": 0.25}
    settings = {
        "model": "mlp",
        "mlp_width": 16,
        "mlp_layers": 3,
        "dropout": 0.3,
        "augment": "flip_jitter",
        "batch_size": 5,
    }
    spec = make_spec(data, settings, epochs=2)
    alone, fused = alone_and_fused(spec, SGD_MEMBERS, tmp_path)
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.epochs_trained == 2
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", SINGLE_LABEL)
    finals = [m.run.history["train_loss"][-1] for m in fused]
    assert len({round(v, 4) for v in finals}) == len(SGD_MEMBERS)  # the members really differ


def test_alexnet_with_dropout_fused_members_equal_their_unfused_runs(tmp_path: Path) -> None:
    # AlexNet's classifier has two Dropout(0.5) layers and the head one more: one shared mask per
    # layer and batch (vmap randomness="same") is each unfused run's mask. 63 px: AlexNet's minimum.
    root = make_imagefolder(tmp_path / "data", classes=3, per_class=4, size=64)
    data = {"format": "imagefolder", "root": str(root), "image_size": 63, "val_fraction": 0.34}
    spec = make_spec(data, {"model": "alexnet", "dropout": 0.3, "batch_size": 4}, epochs=2)
    members = [{"lr": 0.01, "momentum": 0.9}, {"lr": 0.003, "momentum": 0.5, "weight_decay": 1e-3}]
    alone, fused = alone_and_fused(spec, members, tmp_path)
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.epochs_trained == 2
        assert_equal_runs(
            member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", SINGLE_LABEL, tol=TOL32
        )


# Report 003's four runs (r003_tiny_imagenet_losses.yaml): cross-entropy, batch-hard triplet and
# center loss at lambda 0.1 and 1, here with their own learning rates too (r003_tiny_imagenet_tuning)
REPORT_003_MEMBERS: list[dict[str, Any]] = [
    {"loss": "cross_entropy", "lr": 0.05, "momentum": 0.9},
    {"loss": "triplet", "triplet_margin": 0.2, "lr": 0.02, "momentum": 0.9},
    {"loss": "center", "center_loss_lambda": 0.1, "lr": 0.05, "momentum": 0.9},
    {"loss": "center", "center_loss_lambda": 1.0, "center_alpha": 0.3, "lr": 0.01, "momentum": 0.5},
]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("transfer", ["scratch", "features"])
def test_report_003_losses_fused_members_equal_their_unfused_runs(
    transfer: str, colours: Path, tmp_path: Path
) -> None:
    # Each member's own criterion on its own logits and embedding: the triplet member's head reads
    # its detached embedding, the center members move their own centres (checkpointed with the
    # model); with a frozen backbone (features, augmented: the prefix runs once per batch) only
    # the head trains, on the prefix's output. Greyscale as in the report (channels: 1).
    data = {
        "format": "imagefolder",
        "root": str(colours),
        "image_size": 32,
        "val_fraction": 0.25,
        "channels": 1,
    }
    settings = {"model": "resnet18", "transfer": transfer, "pretrained": False, "augment": "flip_jitter"}
    spec = make_spec(data, {**settings, "batch_size": 6}, epochs=2)
    alone, fused = alone_and_fused(spec, REPORT_003_MEMBERS, tmp_path)
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.epochs_trained == 2
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", SINGLE_LABEL)
    for i in (2, 3):  # the center members' centres moved, each its own way
        centres = checkpoint(tmp_path / f"fused{i}")["model"]["center_loss.centers"]
        assert centres.abs().sum() > 0
    centres = [checkpoint(tmp_path / f"fused{i}")["model"]["center_loss.centers"] for i in (2, 3)]
    assert not torch.allclose(centres[0], centres[1])
    finals = [m.run.history["train_loss"][-1] for m in fused]
    assert len({round(v, 4) for v in finals}) == len(REPORT_003_MEMBERS)  # the members really differ


@pytest.mark.usefixtures("float64")
def test_pixel_mlp_with_report_003_losses_runs_its_members_in_turn_as_their_unfused_runs(
    colours: Path, tmp_path: Path
) -> None:
    # report 000's MLP fuses as batched matmuls, which compute no per-member embedding loss: a
    # group with a center or triplet member runs each member's own module in turn instead
    data = {"format": "imagefolder", "root": str(colours), "image_size": 8, "val_fraction": 0.25}
    settings = {"model": "mlp", "mlp_width": 16, "mlp_layers": 3, "dropout": 0.3, "batch_size": 5}
    spec = make_spec(data, settings, epochs=2)
    alone, fused = alone_and_fused(spec, REPORT_003_MEMBERS, tmp_path)
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.epochs_trained == 2
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", SINGLE_LABEL)


def test_multilabel_voc_resnet18_fused_members_equal_their_unfused_runs(tmp_path: Path) -> None:
    # BCE with VOC's difficult flags left out; val_map per member. float32, one epoch (see above).
    root = make_voc(tmp_path / "voc", train=12, val=6, size=32)
    data = {"format": "voc", "root": str(root), "image_size": 32}
    spec = make_spec(data, {"model": "resnet18", "batch_size": 6}, epochs=1)
    alone, fused = alone_and_fused(spec, SGD_MEMBERS[:2], tmp_path)
    metrics = {"train_loss", "train_acc", "val_loss", "val_acc", "val_map", "lr"}
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", metrics, tol=TOL32)


def caltech101_with_test_list(tmp_path: Path) -> dict[str, Any]:
    """Report 004's data section on a synthetic Caltech101 (train and test lists, half of the
    training list held out for validation) at 63 px, AlexNet's smallest input."""
    root = make_caltech101(tmp_path / "caltech", classes=3, per_class=6, size=64)
    lists = {"train_list": "train.txt", "test_list": "test.txt"}
    return {"format": "caltech101", "root": str(root), **lists, "val_fraction": 0.5, "image_size": 63}


def test_report_004_alexnet_with_test_metrics_fused_members_equal_their_unfused_runs(tmp_path: Path) -> None:
    # Report 004's sweeps (studies/r004_caltech_lr_sgd.yaml...) report the held-out test list's
    # metrics every epoch (test_metrics: true); each member's test_* are its unfused run's.
    data = caltech101_with_test_list(tmp_path)
    settings = {"model": "alexnet", "test_metrics": True, "momentum": 0.9, "batch_size": 4}
    spec = make_spec(data, settings, epochs=2)
    members = [{"lr": 0.01}, {"lr": 0.003, "weight_decay": 1e-3}]
    alone, fused = alone_and_fused(spec, members, tmp_path)
    metrics = SINGLE_LABEL | {"test_loss", "test_acc", "test_top5"}
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.epochs_trained == 2
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", metrics, tol=TOL32)
    # the test split is not the validation split, and the members differ on it
    assert fused[0].run.history["test_loss"] != fused[0].run.history["val_loss"]
    assert fused[0].run.history["test_loss"] != fused[1].run.history["test_loss"]


@pytest.mark.parametrize("transfer", ["features", "classifier", "classifier_all"])
def test_report_004_frozen_alexnet_members_equal_their_unfused_runs(transfer: str, tmp_path: Path) -> None:
    # features (studies/r004_caltech_features_sgd.yaml): frozen convolutions, a grid over Nesterov,
    # learning rate and weight decay; the group computes the features once (the unfused run's
    # cache entry) and trains only the classifier; test images still go through the convolutions.
    # classifier / classifier_all (studies/r004_caltech_fc_frozen_sgd.yaml): AlexNet's hidden FC
    # layers frozen between the trained convolutions and the new last layer, or every FC layer
    # frozen. frozen_mode train, as in the report: the frozen layers' dropout stays on, so each
    # member's masks there must be its unfused run's.
    data = caltech101_with_test_list(tmp_path)
    settings = {"model": "alexnet", "transfer": transfer, "pretrained": False, "test_metrics": True}
    spec = make_spec(data, {**settings, "momentum": 0.9, "batch_size": 4}, epochs=2)
    members = [{"lr": 0.01, "nesterov": True}, {"lr": 0.003, "weight_decay": 1e-3}]
    alone, fused = alone_and_fused(spec, members, tmp_path)
    metrics = SINGLE_LABEL | {"test_loss", "test_acc", "test_top5"}
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.epochs_trained == 2
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", metrics, tol=TOL32)
    assert fused[0].run.history["test_loss"] != fused[1].run.history["test_loss"]  # the members differ
    cached = [key for key in fused[0].run.cache if key.startswith(FEATURES_ENTRY)]
    assert len(cached) == (1 if transfer == "features" else 0)  # one entry for the group, the unfused key
    # only the trainable parameters moved: the frozen ones kept their (equal) initial weights
    first, second = checkpoint(tmp_path / "fused0")["model"], checkpoint(tmp_path / "fused1")["model"]
    params = dict(fused[0].model.named_parameters())
    frozen = {name for name, p in params.items() if not p.requires_grad}
    hidden_fc = {name for name in frozen if name.startswith("backbone.classifier")}
    assert frozen and len(frozen) < len(params) and bool(hidden_fc) == (transfer != "features")
    assert all(torch.equal(first[name], second[name]) for name in frozen)
    assert all(not torch.equal(first[name], second[name]) for name in set(params) - frozen)


@pytest.mark.usefixtures("float64")
def test_report_000_frozen_encoder_members_share_one_encoder_pass_per_batch(
    colours: Path, tmp_path: Path
) -> None:
    # studies/r000_celeba_resnet_mlp.yaml: a frozen ResNet-18 encoder under report 000's MLP, in
    # frozen_mode: train (the encoder's batch norm adapts, so no feature cache) and augmented: the
    # encoder runs once per batch for the group; each member's checkpoint holds the encoder's
    # running statistics its unfused run ends with.
    data = {"format": "imagefolder", "root": str(colours), "image_size": 32, "val_fraction": 0.25}
    settings = {"model": "resnet18_mlp", "transfer": "features", "pretrained": False, "mlp_width": 16}
    spec = make_spec(
        data,
        {**settings, "mlp_layers": 2, "dropout": 0.2, "augment": "flip_jitter", "optimizer": "adamw"},
        epochs=2,
    )
    members = [
        {"lr": 1e-3, "weight_decay": 1e-2, "scheduler": "exponential", "gamma": 0.95},
        {"lr": 3e-3, "weight_decay": 1e-3, "scheduler": "exponential", "gamma": 0.9},
    ]
    alone, fused = alone_and_fused(spec, members, tmp_path)
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.epochs_trained == 2
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", SINGLE_LABEL)
    encoder_stats = checkpoint(tmp_path / "fused1")["model"]["backbone.bn1.running_mean"]
    assert not torch.equal(encoder_stats, torch.zeros_like(encoder_stats))  # it adapted, in every member
    assert not any(key.startswith(FEATURES_ENTRY) for key in fused[0].run.cache)


@pytest.mark.usefixtures("float64")
def test_a_killed_frozen_encoder_group_resumes_from_its_members_checkpoints(
    colours: Path, tmp_path: Path
) -> None:
    """The group of frozen-encoder members dies at epoch 2 (member 1's report kills the worker):
    each member has its epoch-1 checkpoint, the whole model with the encoder's adapted batch-norm
    statistics. The retried group resumes every member from it and ends as the uninterrupted
    unfused runs (metrics, checkpoints, encoder statistics)."""
    data = {"format": "imagefolder", "root": str(colours), "image_size": 32, "val_fraction": 0.25}
    settings = {"model": "resnet18", "transfer": "features", "pretrained": False, "augment": "flip_jitter"}
    spec = make_spec(data, {**settings, "batch_size": 6}, epochs=3)
    study = optuna.create_study()
    alone = [make_run(study, spec, p, tmp_path / f"alone{i}") for i, p in enumerate(SGD_MEMBERS[:2])]
    for run in alone:
        train_alone(run)
    crashing = [
        make_run(study, spec, p, tmp_path / f"trial{i}", crash_after=2 if i == 1 else None)
        for i, p in enumerate(SGD_MEMBERS[:2])
    ]
    with pytest.raises(WorkerKilled):
        train_fused(crashing)
    assert [checkpoint(tmp_path / f"trial{i}")["epoch"] for i in range(2)] == [1, 1]
    retry = train_fused(
        [make_run(study, spec, p, tmp_path / f"trial{i}") for i, p in enumerate(SGD_MEMBERS[:2])]
    )
    for i, (member, run) in enumerate(zip(retry, alone, strict=True)):
        resumed = study._storage.get_trial(member.run.trial._trial_id).user_attrs["resumed_from_epoch"]
        assert resumed == 1 and member.epochs_trained == 2 and member.error is None
        for name, values in run.history.items():  # epoch 1 restored from the checkpoint, 2-3 trained
            assert member.run.history[name] == pytest.approx(values, abs=METRIC_TOL64, rel=0), name
        assert member.value == pytest.approx(run.final_value(), abs=METRIC_TOL64, rel=0)
        left, right = checkpoint(tmp_path / f"trial{i}"), checkpoint(tmp_path / f"alone{i}")
        assert left["epoch"] == right["epoch"] == 3
        for key, tensor in left["model"].items():  # the frozen encoder's statistics included
            torch.testing.assert_close(tensor, right["model"][key], atol=TOL64, rtol=RTOL64, msg=key)


@pytest.mark.usefixtures("float64")
def test_a_killed_resnet18_group_trained_in_turn_resumes_each_member_from_its_own_state(
    colours: Path, tmp_path: Path
) -> None:
    """Members trained in turn keep their weights and momentum in their own modules and optimizers
    (nothing stacked): killed at epoch 2 (member 1's report kills the worker), each member's
    epoch-1 checkpoint holds its own state, and the retried group, stepping the resumed optimizer
    state in place, ends as the uninterrupted unfused runs (metrics, weights, batch-norm
    statistics, momentum buffers)."""
    data = {"format": "imagefolder", "root": str(colours), "image_size": 32, "val_fraction": 0.25}
    spec = make_spec(data, {"model": "resnet18", "batch_size": 6}, epochs=3)
    members = SGD_MEMBERS[:2]  # both with momentum: the resumed state is stepped
    study = optuna.create_study()
    alone = [make_run(study, spec, p, tmp_path / f"alone{i}") for i, p in enumerate(members)]
    for run in alone:
        train_alone(run)
    crashing = [
        make_run(study, spec, p, tmp_path / f"trial{i}", crash_after=2 if i == 1 else None)
        for i, p in enumerate(members)
    ]
    with pytest.raises(WorkerKilled):
        train_fused(crashing)
    assert [checkpoint(tmp_path / f"trial{i}")["epoch"] for i in range(2)] == [1, 1]
    assert all(checkpoint(tmp_path / f"trial{i}")["optimizer"]["state"] for i in range(2))
    retry = train_fused([make_run(study, spec, p, tmp_path / f"trial{i}") for i, p in enumerate(members)])
    for i, (member, run) in enumerate(zip(retry, alone, strict=True)):
        resumed = study._storage.get_trial(member.run.trial._trial_id).user_attrs["resumed_from_epoch"]
        assert resumed == 1 and member.epochs_trained == 2 and member.error is None
        assert_equal_runs(member, run, tmp_path / f"trial{i}", tmp_path / f"alone{i}", SINGLE_LABEL)


def test_members_with_different_frozen_statistics_each_get_their_own_prefix_output() -> None:
    """A member that joined from another checkpoint may hold other batch-norm statistics in its
    frozen prefix: it gets its own prefix's output, drawn from the same RNG state (the dropout
    mask its unfused run draws), and members sharing a prefix state end with the updated one."""
    from objectives.vision._fused_frozen import FrozenPrefix

    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    other = copy.deepcopy(first)
    other[1].running_mean.fill_(3.0)  # trained elsewhere: other statistics
    same = copy.deepcopy(first)
    nets = [torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()]
    prefixes = [first, other, same]
    frozen = FrozenPrefix({id(n): p for n, p in zip(nets, prefixes, strict=True)}, cached=False)
    for p in prefixes:
        p.train()
    x = torch.randn(6, 5)
    reference = []
    for p in (first, other):  # what each unfused run computes, from the same RNG state
        torch.manual_seed(1)
        reference.append(copy.deepcopy(p)(x))
    expected_stats = copy.deepcopy(first)
    torch.manual_seed(1)
    expected_stats(x)
    torch.manual_seed(1)
    frozen.begin(nets)
    out, per_member = frozen(x)
    frozen.end()
    assert per_member and out.shape == (3, 6, 4)
    torch.testing.assert_close(out[0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], reference[1], rtol=0, atol=0)
    torch.testing.assert_close(out[2], reference[0], rtol=0, atol=0)
    for member in (first, same):  # the third member ran through the first's prefix and got its statistics
        torch.testing.assert_close(member[1].running_mean, expected_stats[1].running_mean, rtol=0, atol=0)
    assert float(other[1].running_mean.min()) > 2.0  # its own statistics, updated from 3.0
    # evaluated (running statistics normalise), the second member's output is its own prefix's
    for p in prefixes:
        p.eval()
    frozen.begin(nets)
    out, per_member = frozen(x)
    assert per_member and not torch.equal(out[0], out[1])
    torch.testing.assert_close(out[1], other(x), rtol=0, atol=0)
    torch.testing.assert_close(out[2], first(x), rtol=0, atol=0)
    # when the prefixes agree, one shared output (B, ...) for every member
    frozen.begin([nets[0], nets[2]])
    shared, per_member = frozen(x)
    assert not per_member and shared.shape == (6, 4)
    # equal statistics but other frozen weights: not the same function
    changed = copy.deepcopy(first)
    with torch.no_grad():
        changed[0].weight.add_(1.0)
    pair = [torch.nn.Identity(), torch.nn.Identity()]
    weights = FrozenPrefix({id(pair[0]): first, id(pair[1]): changed}, cached=False)
    weights.begin(pair)
    out, per_member = weights(x)
    assert per_member
    torch.testing.assert_close(out[1], changed(x), rtol=0, atol=0)


def small_cnn(seed: int) -> torch.nn.Module:
    """Convolution, batch norm, dropout and a linear layer: each part the two forward passes treat
    differently (grouped convolutions, per-member statistics, one shared mask, batched matmuls)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
    ).double()


def one_fused_step(
    members: list[torch.nn.Module], x: torch.Tensor, in_turn: bool
) -> tuple[Stack, torch.Tensor]:
    """One training step of the members as a fused group (SGD, each its own learning rate), with
    the in-turn or the vmapped forward pass, from RNG seed 3; the stack and the logits."""
    from objectives.vision._fused_cnn import in_turn_forward, stacked_forward

    optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.1 * (k + 1), momentum=0.9) for k, m in enumerate(members)
    ]
    stack = Stack(members, optimizers, in_turn=in_turn)
    torch.manual_seed(3)
    if in_turn:
        logits = in_turn_forward(stack.models, x, training=True)
    else:
        logits = stacked_forward(members[0], stack.params, stack.buffers, x, training=True)
    logits.pow(2).mean(dim=(1, 2)).sum().backward()
    stack.step()
    return stack, logits


def test_members_run_in_turn_compute_their_unfused_steps_as_the_vmapped_forward_does() -> None:
    """The CPU's in-turn forward pass (each member's own module, stepped in place) gives each
    member its unfused step: logits, dropout mask, batch-norm statistics, gradient and
    update; and the same as the vmapped pass, which it replaces on the CPU."""
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    unfused = [small_cnn(seed).train() for seed in range(3)]
    unfused_optimizers, unfused_logits = [], []
    for k, model in enumerate(unfused):  # each member alone, from the batch's RNG state
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * (k + 1), momentum=0.9)
        torch.manual_seed(3)
        logits = model(x)
        logits.pow(2).mean().backward()
        optimizer.step()
        unfused_optimizers.append(optimizer)
        unfused_logits.append(logits.detach())
    after_one_step = torch.get_rng_state()
    for in_turn in (True, False):
        members = [small_cnn(seed).train() for seed in range(3)]
        stack, logits = one_fused_step(members, x, in_turn)
        assert torch.equal(torch.get_rng_state(), after_one_step)  # the next batch draws as unfused
        torch.testing.assert_close(logits.detach(), torch.stack(unfused_logits), rtol=1e-10, atol=1e-12)
        assert all(param.grad is None for param in stack.params.values())
        assert all(param.grad is None for model in members for param in model.parameters())
        assert bool(stack.params) != in_turn  # in turn, nothing is stacked
        stack.write_back()
        for model, alone in zip(members, unfused, strict=True):  # weights and batch-norm statistics
            for (name, got), expected in zip(
                model.state_dict().items(), alone.state_dict().values(), strict=True
            ):
                torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=name)
        for optimizer, alone_optimizer in zip(stack.optimizers, unfused_optimizers, strict=True):
            buffers = [optimizer.state[p]["momentum_buffer"] for p in optimizer.param_groups[0]["params"]]
            expected = [
                alone_optimizer.state[p]["momentum_buffer"] for p in alone_optimizer.param_groups[0]["params"]
            ]
            torch.testing.assert_close(buffers, expected, rtol=1e-10, atol=1e-12)
    assert not torch.equal(unfused_logits[0], unfused_logits[1])  # members with their own weights


def test_a_stack_run_in_turn_keeps_stepping_its_members_over_batches() -> None:
    """Two steps in turn equal two unfused steps (the members' momentum carried in their own
    optimizers), and the members' gradients are cleared after each step."""
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    members = [small_cnn(seed).train() for seed in range(2)]
    unfused = [small_cnn(seed).train() for seed in range(2)]
    stack, _ = one_fused_step(members, x, in_turn=True)
    from objectives.vision._fused_cnn import in_turn_forward

    torch.manual_seed(4)
    in_turn_forward(stack.models, 2 * x, training=True).pow(2).mean(dim=(1, 2)).sum().backward()
    stack.step()
    assert all(param.grad is None for model in members for param in model.parameters())
    for k, model in enumerate(unfused):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * (k + 1), momentum=0.9)
        for seed, batch in ((3, x), (4, 2 * x)):
            torch.manual_seed(seed)
            model(batch).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        for got, expected in zip(members[k].state_dict().values(), model.state_dict().values(), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes one trial (by number) from a given step on: deterministic, in both studies alike."""

    def __init__(self, number: int, step: int) -> None:
        self.number, self.step = number, step

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == self.number and (trial.last_step or 0) >= self.step


@pytest.mark.usefixtures("float64")
def test_a_pruned_or_early_stopped_cnn_member_leaves_and_the_others_are_unchanged(
    colours: Path, tmp_path: Path
) -> None:
    data = {"format": "imagefolder", "root": str(colours), "image_size": 32, "val_fraction": 0.25}
    early = {"rule": "patience", "patience": 1, "min_delta": 1e-3}
    spec = make_spec(data, {"model": "resnet18", "batch_size": 6}, epochs=3, early_stopping=early)
    # trial 1 is pruned at epoch 1 (PruneTrial); lr 0.01 with momentum 0.9 overshoots (val_loss
    # 2.8 -> 18 at epoch 2), so patience 1 stops it there; lr 0.003 without momentum improves every
    # epoch and trains its third epoch alone
    members = [{"lr": 0.003, "momentum": 0.0}, {"lr": 0.02, "momentum": 0.5}, {"lr": 0.01}]
    alone, fused = alone_and_fused(spec, members, tmp_path, pruner=PruneTrial(1, 1))
    assert isinstance(fused[1].error, optuna.TrialPruned) and fused[1].epochs_trained == 1
    assert fused[2].error is None and fused[2].epochs_trained == 2  # early-stopped
    assert fused[0].error is None and fused[0].epochs_trained == 3
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert len(member.run.history["val_loss"]) == len(run.history["val_loss"])
        assert_equal_runs(member, run, tmp_path / f"fused{i}", tmp_path / f"alone{i}", SINGLE_LABEL)


def test_why_not_fusable_names_the_reason_for_cnns() -> None:
    base = ImageClassifierConfig(model="resnet18").model_dump()
    assert why_not_fusable(base, "cpu") is None
    assert why_not_fusable({**base, "transfer": "finetune", "pretrained": False}, "cpu") is None
    assert why_not_fusable({**base, "test_metrics": True}, "cpu") is None  # report 004's studies
    assert why_not_fusable({**base, "transfer": "features", "pretrained": False}, "cpu") is None
    assert why_not_fusable({**base, "model": "resnet18_mlp", "transfer": "features"}, "cpu") is None
    alexnet = {**base, "model": "alexnet", "pretrained": False}
    assert why_not_fusable({**alexnet, "transfer": "classifier"}, "cpu") is None  # report 004's FC-frozen
    assert why_not_fusable({**alexnet, "transfer": "classifier_all", "frozen_mode": "eval"}, "cpu") is None
    assert why_not_fusable({**base, "model": "mlp", "test_metrics": True}, "cpu") is None
    attribute_test = why_not_fusable({**base, "model": "attribute_mlp", "test_metrics": True}, "cpu")
    assert "attribute rows" in str(attribute_test)
    assert "CPU only" in str(why_not_fusable({**base, "model": "mlp"}, "cuda"))
    for loss in ("center", "triplet"):  # report 003's losses: each member's own criterion, in turn
        assert why_not_fusable({**base, "loss": loss}, "cpu") is None
        assert why_not_fusable({**base, "model": "mlp", "loss": loss}, "cpu") is None
    refused = {
        ("compile", True): "compile",
        ("precision", "bf16"): "bf16",
        ("model", "vit_b_16"): "no fused trainer",
    }
    for (option, value), words in refused.items():
        reason = why_not_fusable({**base, option: value}, "cpu")
        assert reason is not None and words in reason, (option, reason)
    assert "CPU only" in str(why_not_fusable(base, "cuda"))


@pytest.mark.slow
def test_hpo_worker_fuses_resnet18_trials(colours: Path, tmp_path: Path, sqlite_url: str) -> None:
    body = f"""
name: cnn
objective: image_classifier
data: {{format: imagefolder, root: {colours}, image_size: 16, val_fraction: 0.25}}
settings: {{model: resnet18, optimizer: sgd, batch_size: 12, scheduler: step, step_size: 1}}
search_space:
  lr: {{type: categorical, choices: [0.05, 0.01]}}
metric: val_loss
direction: minimize
budget: {{max_epochs: 2}}
seed: 0
sampler: grid
"""
    path = write_study(tmp_path, body, "cnn.yaml")
    args = ["worker", str(path), "--storage", sqlite_url, "--checkpoint-dir", str(tmp_path / "ck")]
    result = run_cli([*args, "--fuse", "2", "--no-progress"], env=cli_env({"OMP_NUM_THREADS": "1"}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trials 0, 1 train as one fused group" in result.stdout, result.stdout
    trials = optuna.load_study(study_name="cnn", storage=sqlite_url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)
