"""The image_classifier objective's training loop on small synthetic datasets (CPU).

Trials run in-process through a real Optuna trial and ``TrialRun``, as a worker would run them;
bad data goes through ``hpo worker`` to check what the user sees.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import optuna
import pytest
import torch
import torchvision.transforms.v2.functional as TF
import yaml
from conftest import run_cli
from sklearn.metrics import average_precision_score
from synthetic_data import make_celeba, make_imagefolder, make_tiny_imagenet, make_voc

from hpo._records import trial_metrics
from hpo.errors import HpoError, SpecError
from hpo.objective import TrialRun
from hpo.spec import load_study_file, parse_study
from hpo.training import CHECKPOINT_FILE, build_optimizer
from objectives.vision.augment import IMAGENET_MEAN, IMAGENET_STD, Augmentation, prepare_batch
from objectives.vision.data import DataConfig, load_image_data
from objectives.vision.losses import Criterion
from objectives.vision.models import ImageClassifier, ModelOptions, build_model
from objectives.vision.train import (
    IMAGE_CLASSIFIER,
    Device,
    ImageClassifierConfig,
    Inputs,
    evaluate,
    make_criterion,
    make_inputs,
    train,
    train_one_epoch,
)

MLP = {"model": "mlp", "mlp_width": 32, "mlp_layers": 2, "batch_size": 16, "optimizer": "adam"}


def make_run(
    checkpoint_dir: Path,
    *,
    data: dict[str, Any],
    settings: dict[str, Any],
    params: dict[str, Any] | None = None,
    epochs: int = 2,
    metric: str = "val_loss",
    direction: Literal["minimize", "maximize"] = "minimize",
    cache: dict[str, Any] | None = None,
) -> TrialRun:
    raw = {
        "name": "t",
        "objective": "image_classifier",
        "data": data,
        "settings": settings,
        "search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
        "metric": metric,
        "direction": direction,
        "n_trials": 1,
        "budget": {"max_epochs": epochs},
        "seed": 11,
        "sampler": "random",
    }
    spec = parse_study(raw, "test study")
    trial = optuna.create_study(direction=direction).ask()
    return TrialRun(
        trial=trial,
        spec=spec,
        params=params or {"lr": 1e-2},
        max_epochs=epochs,
        device="cpu",
        checkpoint_dir=checkpoint_dir,
        cache={} if cache is None else cache,
    )


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("colours"), classes=6, per_class=10, size=16)


def test_learns_colour_classes_and_records_every_epoch(colours: Path, tmp_path: Path) -> None:
    data = {"format": "imagefolder", "root": str(colours), "image_size": 12, "val_fraction": 0.3}
    run = make_run(tmp_path, data=data, settings=MLP, epochs=6)
    value = train(run)
    history = run.history
    assert set(history) == {"train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr"}
    assert all(len(v) == 6 for v in history.values())
    assert value == history["val_loss"][-1]
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["val_acc"][-1] >= 0.9  # 6 classes: chance is 1/6
    assert all(t5 >= t1 for t1, t5 in zip(history["val_acc"], history["val_top5"], strict=True))
    run.flush()  # what the worker does when a trial ends
    frozen = run.trial.study._storage.get_trial(run.trial._trial_id)
    assert trial_metrics(frozen) == history  # stored with the trial
    assert frozen.user_attrs["last_epoch"]["epoch"] == 6  # and its short summary, for the dashboard
    assert sorted(frozen.intermediate_values) == [1, 2, 3, 4, 5, 6]


def test_checkpoint_holds_model_optimizer_scheduler_epoch_config(colours: Path, tmp_path: Path) -> None:
    data = {"format": "imagefolder", "root": str(colours), "image_size": 12}
    settings = {**MLP, "scheduler": "step", "step_size": 1, "gamma": 0.5}
    run = make_run(tmp_path, data=data, settings=settings, epochs=2)
    train(run)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 2
    assert state["config"]["config"]["lr"] == 1e-2 and state["config"]["seed"] == 11
    assert state["scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["state"]  # Adam moments
    assert state["history"] == run.history
    assert run.history["lr"] == [1e-2, 5e-3]  # StepLR(1, 0.5), one step per epoch


def test_seeded_runs_are_identical_on_cpu(colours: Path, tmp_path: Path) -> None:
    data = {"format": "imagefolder", "root": str(colours), "image_size": 16}
    settings = {**MLP, "dropout": 0.3, "augment": "flip_jitter_rotation"}
    first = make_run(tmp_path / "a", data=data, settings=settings, epochs=2)
    second = make_run(tmp_path / "b", data=data, settings=settings, epochs=2)
    train(first)
    train(second)
    assert first.history == second.history


def test_resumed_trial_continues_exactly_like_an_uninterrupted_one(colours: Path, tmp_path: Path) -> None:
    data = {"format": "imagefolder", "root": str(colours), "image_size": 16}
    settings = {
        **MLP,
        "optimizer": "sgd",
        "momentum": 0.9,
        "dropout": 0.2,
        "scheduler": "step",
        "step_size": 1,
        "gamma": 0.7,
        "augment": "flip_jitter_rotation",
    }
    whole = make_run(tmp_path / "whole", data=data, settings=settings, epochs=3)
    train(whole)
    # The interrupted attempt got through 2 epochs; its retry (same checkpoint folder) does the rest.
    interrupted = make_run(tmp_path / "retry", data=data, settings=settings, epochs=2)
    train(interrupted)
    retry = make_run(tmp_path / "retry", data=data, settings=settings, epochs=3)
    train(retry)
    frozen = retry.trial.study._storage.get_trial(retry.trial._trial_id)
    assert frozen.user_attrs["resumed_from_epoch"] == 2
    assert retry.history == whole.history
    # A different configuration does not resume someone else's checkpoint.
    other = make_run(tmp_path / "retry", data=data, settings=settings, params={"lr": 0.5}, epochs=1)
    train(other)
    assert len(other.history["val_loss"]) == 1
    assert "resumed_from_epoch" not in other.trial.study._storage.get_trial(other.trial._trial_id).user_attrs


def test_cosine_schedule_resumes_only_with_the_same_epoch_budget(colours: Path, tmp_path: Path) -> None:
    # The checkpointed scheduler carries T_max = the budget it was built for: with another budget
    # the schedule would not be the uninterrupted run's, so the trial starts from epoch 1.
    data = {"format": "imagefolder", "root": str(colours), "image_size": 8}
    settings = {**MLP, "scheduler": "cosine"}
    train(make_run(tmp_path, data=data, settings=settings, epochs=2))
    longer = make_run(tmp_path, data=data, settings=settings, epochs=3)
    train(longer)
    assert (
        "resumed_from_epoch" not in longer.trial.study._storage.get_trial(longer.trial._trial_id).user_attrs
    )
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["config"]["max_epochs"] == 3
    same = make_run(tmp_path, data=data, settings=settings, epochs=3)
    train(same)
    assert same.trial.study._storage.get_trial(same.trial._trial_id).user_attrs["resumed_from_epoch"] == 3


def test_bf16_precision_trains_on_cpu_with_float32_weights(colours: Path, tmp_path: Path) -> None:
    data = {"format": "imagefolder", "root": str(colours), "image_size": 12}
    run = make_run(tmp_path, data=data, settings={**MLP, "precision": "bf16"}, epochs=2)
    train(run)
    assert run.history["train_loss"][-1] < run.history["train_loss"][0]
    weights = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["model"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


def test_multilabel_voc_reports_map_equal_to_scikit_learn(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", train=24, val=16, size=24)
    data = {"format": "voc", "root": str(root), "image_size": 16}
    run = make_run(tmp_path / "ck", data=data, settings=MLP, epochs=2, metric="val_map", direction="maximize")
    value = train(run)
    assert set(run.history) == {"train_loss", "train_acc", "val_loss", "val_acc", "val_map", "lr"}
    assert value == run.history["val_map"][-1]
    # Recompute the last epoch's mAP from the checkpointed model with scikit-learn.
    images = load_image_data(DataConfig.model_validate(data), seed=11)
    model = build_model(
        ModelOptions(name="mlp", num_outputs=20, in_features=3 * 16 * 16, mlp_width=32, mlp_layers=2)
    )
    model.load_state_dict(torch.load(tmp_path / "ck" / CHECKPOINT_FILE, weights_only=True)["model"])
    with torch.no_grad():
        scores = model.eval()(prepare_batch(images.val_images, None, None)).numpy()
    targets = images.val_targets.numpy()
    # voc_difficult: ignore (the default): make_voc marks every second object difficult; a flagged
    # (image, class) pair is left out of that class's AP, and a class without a positive has none.
    assert images.val_ignore is not None and bool(images.val_ignore.any())
    kept = (~images.val_ignore).numpy()
    aps = [
        average_precision_score(targets[kept[:, j], j], scores[kept[:, j], j])
        for j in range(targets.shape[1])
        if targets[kept[:, j], j].sum() > 0
    ]
    assert run.history["val_map"][-1] == pytest.approx(sum(aps) / len(aps), abs=1e-6)
    right = ((scores > 0) == (targets > 0.5)) & kept
    assert run.history["val_acc"][-1] == pytest.approx(right.sum() / kept.sum(), abs=1e-12)


def test_center_loss_centres_are_checkpointed_buffers_moved_by_their_own_rule(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny", classes=4, train_per_class=6, val_per_class=2, size=16)
    data = {"format": "tiny_imagenet", "root": str(root), "image_size": 16}
    settings = {
        "model": "resnet18",
        "batch_size": 8,
        "optimizer": "sgd",
        "loss": "center",
        "center_loss_lambda": 1.0,
        "center_alpha": 0.5,
    }
    run = make_run(tmp_path / "ck", data=data, settings=settings, epochs=2)
    train(run)
    state = torch.load(tmp_path / "ck" / CHECKPOINT_FILE, weights_only=True)
    centres = state["model"]["center_loss.centers"]
    assert centres.shape == (4, 512)
    assert state["model"]["center_loss.initialized"].tolist() == [True] * 4
    # Initialised from the classes' features and moved towards them by convex steps, so, like the
    # post-ReLU features, never negative (randn centres were half negative).
    assert bool((centres >= 0).all()) and float(centres.abs().sum()) > 0
    # The optimizer has only the network's parameters (no centres): one entry per parameter.
    n_params = sum(1 for _ in build_model(ModelOptions(name="resnet18", num_outputs=4)).parameters())
    assert len(state["optimizer"]["param_groups"][0]["params"]) == n_params
    assert len(state["optimizer"]["state"]) == n_params


def test_triplet_loss_trains_the_embedding_and_a_detached_read_out(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny", classes=4, train_per_class=8, val_per_class=2, size=16)
    data = {"format": "tiny_imagenet", "root": str(root), "image_size": 16}
    settings = {**MLP, "loss": "triplet", "triplet_margin": 0.2}
    run = make_run(tmp_path / "ck", data=data, settings=settings, epochs=2)
    train(run)
    assert {"val_loss", "val_acc", "val_top5", "train_loss"} <= set(run.history)
    assert all(v == v and v < float("inf") for v in run.history["train_loss"])  # finite, not NaN
    # The read-out's cross-entropy does not reach the embedding: only the triplet term trains it.
    torch.manual_seed(0)
    model = build_model(ModelOptions(name="mlp", num_outputs=4, in_features=12, mlp_width=8, mlp_layers=2))
    logits, features = model.forward_with_features(torch.randn(4, 12), detach_head=True)
    logits.sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.last_layer.weight.grad is not None
    features.sum().backward()  # the triplet term's path is intact
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_greyscale_decodes_one_channel_and_trains_resnet18_end_to_end(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path / "tiny", classes=4, train_per_class=6, val_per_class=2, size=16)
    rgb = load_image_data(DataConfig(format="tiny_imagenet", root=str(root), image_size=16), seed=0)
    grey = load_image_data(
        DataConfig(format="tiny_imagenet", root=str(root), image_size=16, channels=1), seed=0
    )
    assert grey.train_images.shape == (24, 1, 16, 16) and grey.train_images.dtype == torch.uint8
    # Converted once at decode, with PIL's ITU-R 601-2 luma (transforms.Grayscale on a PIL image):
    # L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 on the decoded RGB pixels (no resize at 16 px).
    r, g, b = (rgb.train_images[:, c].long() for c in range(3))
    luma = ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).to(torch.uint8)
    assert torch.equal(grey.train_images[:, 0], luma)
    assert torch.equal(grey.train_targets, rgb.train_targets)

    data = {"format": "tiny_imagenet", "root": str(root), "image_size": 16, "channels": 1}
    settings = {"model": "resnet18", "batch_size": 8, "optimizer": "sgd", "augment": "flip_jitter_rotation"}
    run = make_run(
        tmp_path / "ck", data=data, settings=settings, epochs=1, metric="val_top5", direction="maximize"
    )
    value = train(run)
    assert 0.0 <= value <= 1.0 and run.history["val_top5"] == [value]
    state = torch.load(tmp_path / "ck" / CHECKPOINT_FILE, weights_only=True)["model"]
    assert state["backbone.conv1.weight"].shape == (64, 1, 7, 7)  # 3,136 parameters, as in report 003


def test_attribute_mlp_predicts_one_celeba_attribute_from_the_others(tmp_path: Path) -> None:
    root = make_celeba(tmp_path / "celeba", n=40, size=8)
    data = {"format": "celeba", "root": str(root), "image_size": 8}
    settings = {**MLP, "model": "attribute_mlp", "target_attribute": "Smiling"}
    run = make_run(tmp_path / "ck", data=data, settings=settings, epochs=2)
    train(run)
    assert "val_map" in run.history and len(run.history["val_acc"]) == 2
    state = torch.load(tmp_path / "ck" / CHECKPOINT_FILE, weights_only=True)["model"]
    assert state["trunk.inp.0.weight"].shape == (32, 39)  # the 39 other attributes are the input
    assert state["head.1.weight"].shape == (1, 32)

    bad = make_run(tmp_path / "bad", data=data, settings={**settings, "target_attribute": "Smiles"}, epochs=1)
    with pytest.raises(HpoError, match=r"target_attribute 'Smiles'.*Smiling"):
        train(bad)


def test_loss_must_fit_the_task(colours: Path, tmp_path: Path) -> None:
    data = {"format": "imagefolder", "root": str(colours), "image_size": 8}
    run = make_run(tmp_path, data=data, settings={**MLP, "loss": "bce"}, epochs=1)
    with pytest.raises(HpoError, match=r"loss: bce is for multi-label datasets"):
        train(run)


def test_inconsistent_settings_are_rejected_when_the_study_file_loads(tmp_path: Path) -> None:
    study = yaml.safe_load(Path("studies/r004_caltech_finetune_sgd.yaml").read_text())
    study["settings"] = {"model": "resnet18", "transfer": "classifier"}
    study["search_space"] = {"lr": {"type": "float", "low": 0.001, "high": 0.1}}
    study.update(sampler="random", n_trials=1)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(
        SpecError, match=r"settings: .*freezes hidden FC layers, which resnet18 does not have"
    ):
        load_study_file(path)


def _worker_study(directory: Path, data: dict[str, Any]) -> Path:
    body = {
        "name": "bad_data",
        "objective": "image_classifier",
        "data": data,
        "settings": MLP,
        "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 2,
        "budget": {"max_epochs": 1},
        "sampler": "random",
    }
    path = directory / "bad_data.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _fail_reason(storage_url: str) -> str:
    (trial,) = optuna.load_study(study_name="bad_data", storage=storage_url).get_trials(
        states=(optuna.trial.TrialState.FAIL,)
    )
    return str(trial.system_attrs["fail_reason"])


@pytest.mark.slow
def test_bad_dataset_path_fails_the_trial_with_the_path_and_layout(tmp_path: Path, sqlite_url: str) -> None:
    missing = tmp_path / "no_such_folder"
    study = _worker_study(tmp_path, {"format": "imagefolder", "root": str(missing), "image_size": 8})
    result = run_cli(["worker", str(study), "--storage", sqlite_url, "--n-trials", "1", "--no-progress"])
    assert result.returncode == 0, result.stderr
    assert "trial 0 FAIL" in result.stdout
    reason = _fail_reason(sqlite_url)
    assert f"data.root: {missing} does not exist" in reason
    assert "root/<class>/<image>" in reason  # the expected layout
    # A mistake in the study's input is printed as its one line, not as the trainer's traceback.
    assert "Traceback" not in result.stdout + result.stderr
    assert f"error: study file: data.root: {missing} does not exist" in result.stdout, result.stdout


@pytest.mark.slow
def test_a_worker_whose_first_trials_all_miss_the_data_says_to_fix_the_input(
    tmp_path: Path, sqlite_url: str
) -> None:
    missing = tmp_path / "no_such_folder"
    study = _worker_study(tmp_path, {"format": "imagefolder", "root": str(missing), "image_size": 8})
    result = run_cli(["worker", str(study), "--storage", sqlite_url, "--no-progress"])
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "the objective looks broken" not in output, output
    assert f"the study's input is wrong: study file: data.root: {missing} does not exist" in output, output
    assert "the first 2 trials of this worker (0, 1) failed on it" in output, output


@pytest.mark.slow
def test_wrong_layout_names_the_missing_file(tmp_path: Path, sqlite_url: str) -> None:
    root = make_imagefolder(tmp_path / "folder", classes=2, per_class=2, size=8)  # not Tiny ImageNet
    study = _worker_study(tmp_path, {"format": "tiny_imagenet", "root": str(root), "image_size": 8})
    result = run_cli(["worker", str(study), "--storage", sqlite_url, "--n-trials", "1", "--no-progress"])
    assert result.returncode == 0, result.stderr
    reason = _fail_reason(sqlite_url)
    assert "wnids.txt" in reason and "tiny_imagenet layout" in reason


def test_bad_data_section_is_one_line_error(tmp_path: Path, sqlite_url: str) -> None:
    study = _worker_study(tmp_path, {"format": "imagenet", "root": str(tmp_path)})
    result = run_cli(["worker", str(study), "--storage", sqlite_url])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "data.format" in result.stderr
    assert "Traceback" not in result.stderr


def _reference_epoch(
    model: ImageClassifier,
    optimizer: torch.optim.Optimizer,
    criterion: Criterion,
    inputs: Inputs,
    augmentation: Augmentation,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """The loop as it was: torchvision's normalize, and each batch's loss and hits read back."""
    model.train()
    torch.manual_seed(seed)
    order = torch.randperm(len(inputs.train_y), generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    loss_sum, hits, count = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        x = augmentation(inputs.train_x[index].float().div_(255.0), generator)
        x = TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
        y = inputs.train_y[index]
        logits, features = model.forward_with_features(x)
        loss = criterion(logits, features, y, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(index)
        hits += int((logits.argmax(1) == y).sum().item())
        count += len(index)
    return {"train_loss": loss_sum / count, "train_acc": hits / count}


def test_device_side_metrics_equal_the_per_batch_read_back(colours: Path) -> None:
    """An epoch that reads nothing back until its end (device-side sums, cached normalisation
    constants) trains the same weights, bit for bit, and reports the same means as the old loop that
    read every batch's loss back (``loss.item()``) and normalised with torchvision."""
    data = load_image_data(DataConfig(format="imagefolder", root=str(colours), image_size=12), 5)
    cfg = ImageClassifierConfig(**{**MLP, "dropout": 0.2, "batch_size": 20, "augment": "flip_jitter"})
    inputs = make_inputs(cfg, data)
    assert len(inputs.train_y) % 20 not in (0, 1)  # a partial last batch, which is trained on
    options = ModelOptions(name="mlp", num_outputs=6, mlp_width=32, mlp_layers=2, in_features=3 * 12 * 12)
    torch.manual_seed(0)
    model = build_model(options)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer("adam", model.trainable_parameters(), 1e-2)
    ref_optimizer = build_optimizer("adam", reference.trainable_parameters(), 1e-2)
    augmentation = Augmentation.preset("flip_jitter")
    on = Device.for_run("cpu")
    for epoch in (1, 2):
        got = train_one_epoch(
            model,
            optimizer,
            make_criterion(cfg, inputs),
            inputs,
            batch_size=20,
            augmentation=augmentation,
            seed=epoch,
            on=on,
        )
        want = _reference_epoch(
            reference, ref_optimizer, make_criterion(cfg, inputs), inputs, augmentation, 20, epoch
        )
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-12, abs=0)
        assert got["train_acc"] == want["train_acc"]
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, reference.state_dict()[name]), name

    # validation in batches of 7 against per-batch sums read back one by one
    got = evaluate(model, make_criterion(cfg, inputs), inputs, batch_size=7, on=on)
    model.eval()
    loss_sum, hits, top5 = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(inputs.val_y), 7):
            logits = model(prepare_batch(inputs.val_x[start : start + 7], None, None))
            y = inputs.val_y[start : start + 7]
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            hits += int((logits.argmax(1) == y).sum().item())
            top5 += int((logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum().item())
    n = len(inputs.val_y)
    assert got["val_loss"] == pytest.approx(loss_sum / n, rel=1e-6)
    assert (got["val_acc"], got["val_top5"]) == (hits / n, top5 / n)


def test_ignored_labels_change_nothing_in_training_or_evaluation() -> None:
    """VOC's difficult labels (``Inputs.train_ignore`` / ``val_ignore``): the loss, ``train_acc``,
    ``val_acc`` and ``val_map`` leave flagged pairs out, so what their targets say changes neither
    the trained weights nor a metric, and the metrics are those of the pairs left."""
    g = torch.Generator().manual_seed(0)
    n, k, d = 50, 5, 12
    x = torch.randn(n, d, generator=g)  # feature vectors: images=False
    y = (torch.rand(n, k, generator=g) < 0.4).float()
    ignore = torch.rand(n, k, generator=g) < 0.25
    flipped = torch.where(ignore, 1.0 - y, y)
    on = Device.for_run("cpu")
    criterion = Criterion("bce")

    def run(targets: torch.Tensor, flags: torch.Tensor | None) -> tuple[dict[str, float], ImageClassifier]:
        inputs = Inputs(
            *(x[:30], targets[:30], x[30:], targets[30:]),
            images=False,
            multilabel=True,
            num_outputs=k,
            train_ignore=flags[:30] if flags is not None else None,
            val_ignore=flags[30:] if flags is not None else None,
        )
        torch.manual_seed(0)
        model = build_model(
            ModelOptions(name="mlp", num_outputs=k, in_features=d, mlp_width=16, mlp_layers=2)
        )
        optimizer = build_optimizer("adam", model.trainable_parameters(), 1e-2)
        metrics: dict[str, float] = {}
        for epoch in (1, 2):
            metrics = train_one_epoch(
                model, optimizer, criterion, inputs, batch_size=8, augmentation=None, seed=epoch, on=on
            )
        return metrics | evaluate(model, criterion, inputs, batch_size=7, on=on), model

    got, model = run(y, ignore)
    same, other = run(flipped, ignore)
    assert got == same
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name
    assert run(flipped, None)[0] != got  # without the flags the flipped targets do count

    model.eval()
    with torch.no_grad():
        logits = model(x[30:])
    vy, kept = y[30:], ~ignore[30:]
    right = ((logits > 0) == (vy > 0.5)) & kept
    assert got["val_acc"] == pytest.approx(int(right.sum()) / int(kept.sum()), abs=1e-12)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[kept], vy[kept])
    assert got["val_loss"] == pytest.approx(float(bce), rel=1e-6)
    aps = [
        average_precision_score(vy[kept[:, j], j].numpy(), logits[kept[:, j], j].numpy())
        for j in range(k)
        if vy[kept[:, j], j].sum() > 0
    ]
    assert got["val_map"] == pytest.approx(sum(aps) / len(aps), abs=1e-9)


def test_every_option_is_classified_for_fused_attribute_mlp_trials() -> None:
    """Each option of the config either may differ within a fused group or must be equal; a new
    option must be put in one of the two (objectives/vision/_fused_mlp.py). One left out fuses
    only at its default."""
    from objectives.vision import _fused_mlp
    from objectives.vision._fused_mlp import ATTRIBUTE_MLP_MAY_DIFFER, ATTRIBUTE_MLP_MUST_EQUAL

    assert not ATTRIBUTE_MLP_MAY_DIFFER & ATTRIBUTE_MLP_MUST_EQUAL
    assert set(ImageClassifierConfig.model_fields) == ATTRIBUTE_MLP_MAY_DIFFER | ATTRIBUTE_MLP_MUST_EQUAL
    assert IMAGE_CLASSIFIER.fused_train is _fused_mlp.train_fused
    assert IMAGE_CLASSIFIER.may_differ == ATTRIBUTE_MLP_MAY_DIFFER
    why_not = IMAGE_CLASSIFIER.why_not_fusable
    assert why_not is not None

    base = ImageClassifierConfig(**{**MLP, "model": "attribute_mlp", "target_attribute": "Smiling"})
    assert why_not(base.model_dump(), "cpu") is None
    assert why_not({**base.model_dump(), "checkpoint_every": 3, "checkpoint_async": True}, "cpu") is None
    assert why_not({**base.model_dump(), "precision": "fp32", "compile_mode": "max-autotune"}, "cpu") is None
    assert why_not({**base.model_dump(), "loss": "center", "center_loss_lambda": 1.0}, "cpu") is None
    refused = {
        "precision": "bf16",
        "compile": True,
        "test_metrics": True,
        "model": "vit_b_16",  # no such model: no fused trainer
    }
    for option, value in refused.items():
        assert why_not({**base.model_dump(), option: value}, "cpu") is not None, option
    assert why_not(base.model_dump(), "cuda") is not None

    # An option nobody classified: fusable at its default, refused otherwise.
    unclassified = ATTRIBUTE_MLP_MUST_EQUAL - {"eval_batch_size"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fused_mlp, "ATTRIBUTE_MLP_MUST_EQUAL", unclassified)
        assert why_not(base.model_dump(), "cpu") is None
        reason = why_not({**base.model_dump(), "eval_batch_size": 7}, "cpu")
        assert reason is not None and "eval_batch_size=7" in reason
