"""The image-classification objective (``objective: image_classifier``).

One training loop for the five reports' searches: a torchvision model (AlexNet, VGG16, ResNet-18,
ResNet-50, EfficientNet-B0) or report 000's residual MLP, a transfer mode, SGD/Adam/AdamW, a
per-epoch learning-rate schedule, an augmentation preset and a loss, every one an option of
:class:`ImageClassifierConfig` that a study fixes under ``settings:`` or searches.

The fast path: the dataset is decoded and resized once per worker into uint8 tensors (on the
GPU when it fits, see :mod:`objectives.vision.data`) and reused by every trial; batches are cut
from those tensors, augmented and normalised on the device; metrics accumulate on the device and
are read back once per epoch. On CUDA, bf16 autocast, channels_last and cuDNN autotuning are on
(``precision: bf16`` also autocasts on the CPU; ``fp32`` turns it off on CUDA).
The same code runs on the CPU, where it is seeded and reproducible: each epoch's shuffling,
augmentation and dropout come from a seed derived from (study seed, epoch), so a trial resumed
from its checkpoint continues exactly as if it had never stopped.

Every epoch reports ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc`` and ``lr``, plus
``val_top5`` (single-label) or ``val_map`` (multi-label) to the study, and writes a checkpoint
(model, optimizer, scheduler, epoch, config) that a retried trial resumes from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hpo.errors import HpoError
from hpo.objective import Objective, TrialRun
from hpo.training import (
    build_optimizer,
    build_scheduler,
    epoch_seed,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from objectives.vision.augment import Augmentation, AugmentPreset, prepare_batch
from objectives.vision.data import DataConfig, ImageData, load_image_data
from objectives.vision.features import FeatureCacheMode, use_feature_cache
from objectives.vision.losses import Criterion
from objectives.vision.metrics import EpochMeter, mean_average_precision, multilabel_correct, topk_correct
from objectives.vision.models import (
    MLP_MODELS,
    FrozenMode,
    ImageClassifier,
    ModelName,
    ModelOptions,
    TransferMode,
    build_model,
    check_pretrained_weights,
)

_HIDDEN_FC_MODELS = ("alexnet", "vgg16")


class ImageClassifierConfig(BaseModel):
    """Every option of the objective; each can be fixed under ``settings:`` or searched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # model
    model: ModelName = "resnet18"
    transfer: TransferMode = "scratch"
    pretrained: bool | None = Field(
        default=None, description="ImageNet weights; default: yes unless transfer is scratch"
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout before the new last layer")
    mlp_width: int = Field(default=256, ge=2, le=16384)
    mlp_layers: int = Field(default=11, ge=1, le=128)
    target_attribute: str | None = Field(default=None, description="attribute_mlp: the attribute predicted")
    encoder_checkpoint: str | None = Field(default=None, description="resnet18_mlp: saved ResNet-18 encoder")
    frozen_mode: FrozenMode = Field(
        default="train",
        description="frozen parts in training mode (dropout on, BN statistics adapt: the reports) or eval",
    )
    # optimisation
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=1e-3, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0.0)
    batch_size: int = Field(default=64, ge=2, le=65536)  # >= 2: batch norm needs two samples
    eval_batch_size: int = Field(default=256, ge=1, le=65536)
    scheduler: Literal["none", "step", "exponential", "cosine"] = "none"
    step_size: int = Field(default=10, ge=1)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    # data and loss
    augment: AugmentPreset = "none"
    loss: Literal["auto", "cross_entropy", "bce", "center", "triplet"] = "auto"
    center_loss_lambda: float = Field(default=0.1, ge=0.0)
    center_alpha: float = Field(
        default=0.5, ge=0.0, le=1.0, description="center loss: the centres' own update rate"
    )
    triplet_margin: float = Field(default=0.2, ge=0.0, description="triplet loss: the hinge's margin")
    # compute
    feature_cache: FeatureCacheMode = Field(
        default="auto",
        description="auto: a frozen, deterministic backbone's features are computed once (features.py)",
    )
    test_metrics: bool = Field(
        default=False,
        description="also report test_loss/test_acc/test_top5 on data.test_list's split (never searched on)",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, fp32 on the CPU"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ImageClassifierConfig:
        if self.transfer == "scratch" and self.pretrained:
            raise ValueError("transfer: scratch trains from random weights; drop pretrained: true")
        if self.transfer in ("classifier", "classifier_all") and self.model not in _HIDDEN_FC_MODELS:
            raise ValueError(
                f"transfer: {self.transfer} freezes hidden FC layers, which {self.model} does not have "
                "(use alexnet or vgg16, or transfer scratch, finetune or features)"
            )
        if self.model in MLP_MODELS and self.transfer != "scratch":
            raise ValueError(f"model {self.model} has no pretrained weights; use transfer: scratch")
        if self.model == "attribute_mlp" and not self.target_attribute:
            raise ValueError("model attribute_mlp needs target_attribute (e.g. Smiling)")
        return self

    @property
    def use_pretrained(self) -> bool:
        return self.pretrained if self.pretrained is not None else self.transfer != "scratch"


@dataclass(frozen=True)
class Inputs:
    """What the loop trains on: images (uint8) or feature vectors (float), targets, and the task."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    images: bool
    multilabel: bool
    num_outputs: int


def make_inputs(cfg: ImageClassifierConfig, data: ImageData) -> Inputs:
    """Turn the dataset into the model's inputs and targets (see ``attribute_mlp``)."""
    multilabel = data.task == "multilabel"
    if cfg.model != "attribute_mlp":
        return Inputs(
            data.train_images,
            data.train_targets,
            data.val_images,
            data.val_targets,
            images=True,
            multilabel=multilabel,
            num_outputs=len(data.classes),
        )
    # Report 000: predict one CelebA attribute from the other attributes (no pixels).
    if not multilabel:
        raise HpoError(
            "model attribute_mlp reads CelebA's attributes, but this dataset is single-label "
            "(fix: data: {format: celeba}, with all attributes and no data.target_attribute)"
        )
    if cfg.target_attribute not in data.classes:
        raise HpoError(
            f"target_attribute {cfg.target_attribute!r} is not an attribute of this dataset "
            f"(fix: use data format celeba and one of: {', '.join(data.classes)})"
        )
    target = data.classes.index(cfg.target_attribute)
    others = [i for i in range(len(data.classes)) if i != target]

    def split(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = targets.float()
        return targets[:, others], targets[:, target : target + 1]

    train_x, train_y = split(data.train_targets)
    val_x, val_y = split(data.val_targets)
    return Inputs(train_x, train_y, val_x, val_y, images=False, multilabel=True, num_outputs=1)


def make_criterion(cfg: ImageClassifierConfig, inputs: Inputs) -> Criterion:
    loss = cfg.loss
    if loss == "auto":
        loss = "bce" if inputs.multilabel else "cross_entropy"
    if inputs.multilabel and loss != "bce":
        raise HpoError(
            f"loss: {loss} needs single-label classes, but this dataset is multi-label (fix: loss: bce)"
        )
    if not inputs.multilabel and loss == "bce":
        raise HpoError("loss: bce is for multi-label datasets (voc, celeba) (fix: loss: cross_entropy)")
    return Criterion(loss, cfg.center_loss_lambda, cfg.triplet_margin)


@dataclass(frozen=True)
class Device:
    """Where and how to compute: channels_last on CUDA; bf16 autocast where asked for."""

    device: torch.device
    bf16: bool = False

    @classmethod
    def for_run(cls, device: str, precision: str = "auto") -> Device:
        """``precision: auto`` is bf16 autocast on CUDA and fp32 on the CPU (where the tests run)."""
        target = torch.device(device)
        return cls(target, bf16=precision == "bf16" or (precision == "auto" and target.type == "cuda"))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generator(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator


def _batches(n: int, batch_size: int, drop_single: bool) -> Iterator[tuple[int, int]]:
    # A final batch of one sample is skipped in training: batch norm cannot normalise it.
    stop = n - 1 if drop_single and n % batch_size == 1 and n > 1 else n
    for start in range(0, stop, batch_size):
        yield start, min(start + batch_size, stop)


def _model_input(
    x: torch.Tensor,
    images: bool,
    on: Device,
    augmentation: Augmentation | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    x = x.to(on.device, non_blocking=True)
    if not images:
        return x.float()
    return prepare_batch(x, augmentation, generator, channels_last=on.cuda)


def train_one_epoch(
    model: ImageClassifier,
    optimizer: torch.optim.Optimizer,
    criterion: Criterion,
    inputs: Inputs,
    *,
    batch_size: int,
    augmentation: Augmentation | None,
    seed: int,
    on: Device,
) -> dict[str, float]:
    """One pass over the training set in a seeded random order; mean loss and accuracy."""
    model.train()
    torch.manual_seed(seed)  # dropout masks
    order = torch.randperm(len(inputs.train_y), generator=torch.Generator().manual_seed(seed))
    order = order.to(inputs.train_x.device)
    generator = on.generator(seed) if augmentation is not None and augmentation.active else None
    meter = EpochMeter()
    for start, stop in _batches(len(order), batch_size, drop_single=True):
        index = order[start:stop]
        x = _model_input(inputs.train_x[index], inputs.images, on, augmentation, generator)
        y = inputs.train_y[index].to(on.device, non_blocking=True)
        with on.autocast():
            # Triplet: the read-out head learns from the detached embedding (see losses.py).
            logits, features = model.forward_with_features(x, detach_head=criterion.name == "triplet")
            # Center loss also moves its centres here (their own update, not the optimizer's).
            loss = criterion(logits, features, y, model.center_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = stop - start
        meter.add("train_loss", loss.detach() * n, n)
        if inputs.multilabel:
            meter.add("train_acc", multilabel_correct(logits.detach(), y), y.numel())
        else:
            meter.add("train_acc", topk_correct(logits.detach(), y, 1), n)
    return meter.compute()


@torch.no_grad()
def evaluate(
    model: ImageClassifier, criterion: Criterion, inputs: Inputs, *, batch_size: int, on: Device
) -> dict[str, float]:
    """Validation loss (the classification term), accuracy, and top-5 accuracy or mAP."""
    model.eval()
    n = len(inputs.val_y)
    logits = torch.empty(n, inputs.num_outputs, device=on.device, dtype=torch.float32)
    for start, stop in _batches(n, batch_size, drop_single=False):
        x = _model_input(inputs.val_x[start:stop], inputs.images, on, None, None)
        with on.autocast():
            logits[start:stop] = model(x).float()
    y = inputs.val_y.to(on.device)
    meter = EpochMeter()
    meter.add("val_loss", criterion.eval_loss(logits, y, reduction="sum"), n)
    if inputs.multilabel:
        meter.add("val_acc", multilabel_correct(logits, y), y.numel())
        meter.add("val_map", mean_average_precision(logits, y), 1)
    else:
        meter.add("val_acc", topk_correct(logits, y, 1), n)
        meter.add("val_top5", topk_correct(logits, y, 5), n)
    return meter.compute()


def _parse_config(config: dict[str, Any]) -> ImageClassifierConfig:
    try:
        return ImageClassifierConfig(**config)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "configuration"
        raise HpoError(f"image_classifier: {where}: {first['msg']}") from None


def _optimizer(cfg: ImageClassifierConfig, model: ImageClassifier) -> torch.optim.Optimizer:
    # Center loss's centres are buffers with their own update rule: the optimizer never sees them.
    groups: list[dict[str, Any]] = [{"params": model.trainable_parameters()}]
    return build_optimizer(cfg.optimizer, groups, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)


def _test_inputs(cfg: ImageClassifierConfig, data: ImageData, inputs: Inputs) -> Inputs | None:
    """``inputs`` with the held-out test split in place of validation (``test_metrics: true``)."""
    if not cfg.test_metrics:
        return None
    if data.test_images is None or data.test_targets is None or not inputs.images:
        raise HpoError(
            "test_metrics: true needs a held-out test split of images "
            "(fix: data: {format: caltech101, train_list: ..., test_list: ...}, or drop test_metrics)"
        )
    return dataclasses.replace(inputs, val_x=data.test_images, val_y=data.test_targets)


def train(run: TrialRun) -> float:
    """Train one configuration for ``run.max_epochs`` epochs, reporting every epoch."""
    cfg = _parse_config(run.config)
    data_cfg = DataConfig(**run.data)
    on = Device.for_run(run.device, cfg.precision)
    if on.cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    # Missing ImageNet weights are reported before the dataset is decoded (minutes on Caltech101).
    check_pretrained_weights(cfg.model, cfg.use_pretrained, cfg.encoder_checkpoint)
    data = load_image_data(data_cfg, run.seed, cache=run.cache, device=run.device, test=cfg.test_metrics)
    inputs = make_inputs(cfg, data)
    test_inputs = _test_inputs(cfg, data, inputs)
    criterion = make_criterion(cfg, inputs)
    augmentation = Augmentation.preset(cfg.augment) if inputs.images else None

    seed_everything(run.seed)
    image_size = int(inputs.train_x.shape[-1])
    channels = int(inputs.train_x.shape[1]) if inputs.images else 3  # data.channels: 1 is greyscale
    model = build_model(
        ModelOptions(
            name=cfg.model,
            num_outputs=inputs.num_outputs,
            transfer=cfg.transfer,
            pretrained=cfg.use_pretrained,
            dropout=cfg.dropout,
            mlp_width=cfg.mlp_width,
            mlp_layers=cfg.mlp_layers,
            in_features=channels * image_size * image_size if inputs.images else int(inputs.train_x.shape[1]),
            encoder_checkpoint=cfg.encoder_checkpoint,
            center_loss=criterion.name == "center",
            center_alpha=cfg.center_alpha,
            in_channels=channels,
            frozen_mode=cfg.frozen_mode,
        )
    ).to(on.device)
    if on.cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    scheduler = build_scheduler(
        cfg.scheduler, optimizer, step_size=cfg.step_size, gamma=cfg.gamma, epochs=run.max_epochs
    )

    # A checkpoint is resumed only by the same configuration, data and seed (and epoch budget,
    # where the schedule depends on it: cosine's T_max is restored with the scheduler's state).
    # feature_cache is left out: cached and recomputed runs are the same run, either may resume the other.
    config_id = cfg.model_dump(exclude={"feature_cache"})
    identity: dict[str, Any] = {"config": config_id, "data": data_cfg.model_dump(), "seed": run.seed}
    if cfg.scheduler == "cosine":
        identity["max_epochs"] = run.max_epochs
    start_epoch = 1
    restored = load_checkpoint(
        run.checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler, config=identity
    )
    if restored is not None:
        start_epoch = run.resume(restored[1]) + 1

    # A frozen, deterministic backbone runs once: ``net`` is then the trainable rest of ``model``
    # (same parameters), trained on the cached features.
    net, inputs = use_feature_cache(
        cfg.feature_cache,
        model,
        inputs,
        augmentation=augmentation,
        cache=run.cache,
        data_key=f"{data_cfg.model_dump_json()}:{run.seed}:{run.device}",
        batch_size=cfg.eval_batch_size,
        device=on.device,
        bf16=on.bf16,
    )
    for epoch in range(start_epoch, run.max_epochs + 1):
        lr = float(optimizer.param_groups[0]["lr"])
        metrics = train_one_epoch(
            net,
            optimizer,
            criterion,
            inputs,
            batch_size=cfg.batch_size,
            augmentation=augmentation,
            seed=epoch_seed(run.seed, epoch),
            on=on,
        )
        if scheduler is not None:
            scheduler.step()
        metrics |= evaluate(net, criterion, inputs, batch_size=cfg.eval_batch_size, on=on)
        if test_inputs is not None:  # the whole model on the test images (never a feature cache)
            test = evaluate(model, criterion, test_inputs, batch_size=cfg.eval_batch_size, on=on)
            metrics |= {"test_" + name.removeprefix("val_"): value for name, value in test.items()}
        metrics["lr"] = lr
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


IMAGE_CLASSIFIER = Objective(
    train=train,
    config=ImageClassifierConfig,
    data=DataConfig,
    description="image classification with torchvision models or report 000's MLP (reports 000-004)",
    # The union over tasks: val_top5 is reported for single-label data, val_map for multi-label.
    # test_* only with test_metrics: true (report 004's held-out test list).
    metrics=(
        *("val_loss", "val_acc", "val_top5", "val_map", "train_loss", "train_acc", "lr"),
        *("test_loss", "test_acc", "test_top5", "test_map"),
    ),
)
