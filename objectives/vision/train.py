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
``val_top5`` (single-label) or ``val_map`` (multi-label) to the study. A checkpoint (model,
optimizer, scheduler, epoch, config) that a retried trial resumes from is written every
``checkpoint_every`` epochs and always at the trial's last epoch (the budget's end, early stopping
or pruning); a trial killed between two checkpoints resumes from the earlier one and replays the
missing epochs with their own seeds, so its result equals the uninterrupted run's.

The GPU loop never waits for the device inside an epoch: normalisation constants live on the
device, metrics are summed there (one read-back per epoch), ``order`` and targets move with
``non_blocking`` copies, optimizers are fused on CUDA (:func:`hpo.training.build_optimizer`), and
data kept on the host is gathered into pinned memory and copied on a side stream one batch ahead
(:mod:`objectives.vision._gpu`). ``compile: true`` runs the model through ``torch.compile``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import optuna
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hpo.errors import HpoError
from hpo.objective import Objective, TrialRun
from hpo.training import (
    CheckpointWriter,
    build_optimizer,
    build_scheduler,
    checkpoint_due,
    epoch_seed,
    load_checkpoint,
    seed_everything,
)
from objectives.vision._fused_mlp import ATTRIBUTE_MLP_MAY_DIFFER, train_fused, why_not_fusable
from objectives.vision._gpu import Forward, compiled_forward, device_batches
from objectives.vision._inputs import Inputs, make_criterion, make_inputs, split_ignore, with_ignore
from objectives.vision._inputs import held_out_inputs as _test_inputs
from objectives.vision.augment import Augmentation, AugmentPreset, prepare_batch
from objectives.vision.data import DataConfig, load_image_data
from objectives.vision.features import FeatureCacheMode, use_feature_cache
from objectives.vision.losses import Criterion
from objectives.vision.metrics import (
    EpochMeter,
    counted_labels,
    mean_average_precision,
    multilabel_correct,
    topk_correct,
)
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
    encoder_checkpoint: str | None = Field(
        default=None, description="a saved encoder: a path or artifact:STUDY[#topR] (hpo retrain)"
    )
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
    compile: bool = Field(default=False, description="torch.compile the model's forward (and backward)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        default="default",
        description="torch.compile mode; reduce-overhead records CUDA graphs (one per batch shape)",
    )
    checkpoint_every: int = Field(
        default=1, ge=1, description="write a checkpoint every N epochs (and always at the trial's last)"
    )
    checkpoint_async: bool = Field(
        default=False, description="write checkpoints in a background thread (training goes on meanwhile)"
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
    forward: Forward | None = None,
) -> dict[str, float]:
    """One pass over the training set in a seeded random order; mean loss and accuracy.

    ``forward``: what computes ``(logits, features)`` (default ``model.forward_with_features``; a
    compiled one with ``compile: true``). Reads nothing back from the device until the epoch's
    end (:meth:`EpochMeter.compute`)."""
    return train_epoch_sums(
        model,
        optimizer,
        criterion,
        inputs,
        batch_size=batch_size,
        augmentation=augmentation,
        seed=seed,
        on=on,
        forward=forward,
    ).compute()


def train_epoch_sums(
    model: ImageClassifier,
    optimizer: torch.optim.Optimizer,
    criterion: Criterion,
    inputs: Inputs,
    *,
    batch_size: int,
    augmentation: Augmentation | None,
    seed: int,
    on: Device,
    forward: Forward | None = None,
) -> EpochMeter:
    """:func:`train_one_epoch` without the read-back: the epoch's sums, still on the device."""
    model.train()
    torch.manual_seed(seed)  # dropout masks
    order = torch.randperm(len(inputs.train_y), generator=torch.Generator().manual_seed(seed))
    order = order.to(inputs.train_x.device, non_blocking=True)
    generator = on.generator(seed) if augmentation is not None and augmentation.active else None
    forward = forward if forward is not None else model.forward_with_features
    detach_head = criterion.name == "triplet"
    meter = EpochMeter()
    spans = list(_batches(len(order), batch_size, drop_single=True))
    targets, width = with_ignore(inputs.train_y, inputs.train_ignore)
    for bx, by in device_batches(inputs.train_x, targets, spans, order, on.device):
        y, ignore = split_ignore(by, width)
        x = _model_input(bx, inputs.images, on, augmentation, generator)
        with on.autocast():
            # Triplet: the read-out head learns from the detached embedding (see losses.py).
            logits, features = forward(x, detach_head=detach_head)
            # Center loss also moves its centres here (their own update, not the optimizer's).
            loss = criterion(logits, features, y, model.center_loss, ignore=ignore)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        add_train_batch(meter, loss, logits, y, ignore, inputs.multilabel)
    return meter


def add_train_batch(
    meter: EpochMeter,
    loss: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    ignore: torch.Tensor | None,
    multilabel: bool,
) -> None:
    """Add one training batch's loss (its mean) and accuracy to ``meter`` (the fused trainer, for
    each member, too)."""
    n = len(y)
    meter.add("train_loss", loss.detach().double() * n, n)  # float64: no rounding of the product
    if multilabel:
        meter.add("train_acc", multilabel_correct(logits.detach(), y, ignore), counted_labels(y, ignore))
    else:
        meter.add("train_acc", topk_correct(logits.detach(), y, 1), n)


@torch.no_grad()
def evaluate(
    model: ImageClassifier,
    criterion: Criterion,
    inputs: Inputs,
    *,
    batch_size: int,
    on: Device,
    forward: Forward | None = None,
) -> dict[str, float]:
    """Validation loss (the classification term), accuracy, and top-5 accuracy or mAP."""
    return evaluate_sums(model, criterion, inputs, batch_size=batch_size, on=on, forward=forward).compute()


@torch.no_grad()
def evaluate_sums(
    model: ImageClassifier,
    criterion: Criterion,
    inputs: Inputs,
    *,
    batch_size: int,
    on: Device,
    forward: Forward | None = None,
) -> EpochMeter:
    """:func:`evaluate` without the read-back: the sums, still on the device."""
    model.eval()
    n = len(inputs.val_y)
    logits = torch.empty(n, inputs.num_outputs, device=on.device, dtype=torch.float32)
    spans = list(_batches(n, batch_size, drop_single=False))
    for (start, stop), (bx, _) in zip(
        spans, device_batches(inputs.val_x, inputs.val_y, spans, None, on.device), strict=True
    ):
        x = _model_input(bx, inputs.images, on, None, None)
        with on.autocast():
            out = forward(x)[0] if forward is not None else model(x)
            logits[start:stop] = out.float()
    return val_sums(logits, criterion, inputs, on)


def val_sums(logits: torch.Tensor, criterion: Criterion, inputs: Inputs, on: Device) -> EpochMeter:
    """The validation metrics' sums for the logits of every validation sample (the fused trainer,
    for each member, too)."""
    n = len(inputs.val_y)
    y = inputs.val_y.to(on.device, non_blocking=True)
    ignore = inputs.val_ignore.to(on.device, non_blocking=True) if inputs.val_ignore is not None else None
    meter = EpochMeter()
    meter.add("val_loss", criterion.eval_loss(logits, y, reduction="sum", ignore=ignore), n)
    if inputs.multilabel:
        meter.add("val_acc", multilabel_correct(logits, y, ignore), counted_labels(y, ignore))
        meter.add("val_map", mean_average_precision(logits, y, ignore), 1)
    else:
        meter.add("val_acc", topk_correct(logits, y, 1), n)
        meter.add("val_top5", topk_correct(logits, y, 5), n)
    return meter


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


def build_trial_model(cfg: ImageClassifierConfig, inputs: Inputs, criterion: Criterion) -> ImageClassifier:
    """The trial's model, on the CPU, as the configuration and its inputs define it (the caller
    seeds the RNGs first; the fused trainer builds each member with it too)."""
    image_size = int(inputs.train_x.shape[-1])
    channels = int(inputs.train_x.shape[1]) if inputs.images else 3  # data.channels: 1 is greyscale
    return build_model(
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
    )


def feature_data_key(data_cfg: DataConfig, run: TrialRun) -> str:
    """The dataset a trial's frozen features are cached under (fused groups share the entry)."""
    return f"{data_cfg.model_dump_json()}:{run.seed}:{run.device}"


def checkpoint_identity(
    cfg: ImageClassifierConfig, data_cfg: DataConfig, seed: int, max_epochs: int
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (fused and unfused runs write the same, so either
    resumes the other)."""
    # A checkpoint is resumed only by the same configuration, data and seed (and epoch budget,
    # where the schedule depends on it: cosine's T_max is restored with the scheduler's state).
    # feature_cache is left out: cached and recomputed runs are the same run, either may resume the other;
    # so is checkpoint_every (when to save changes nothing trained). compile counts when on (compiled
    # kernels round differently) and is left out when off, so checkpoints from before it still resume.
    left_out = {"feature_cache", "checkpoint_every", "checkpoint_async"}
    left_out |= set() if cfg.compile else {"compile", "compile_mode"}
    identity: dict[str, Any] = {
        "config": cfg.model_dump(exclude=left_out),
        "data": data_cfg.model_dump(),
        "seed": seed,
    }
    if cfg.scheduler == "cosine":
        identity["max_epochs"] = max_epochs
    return identity


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
    model = build_trial_model(cfg, inputs, criterion).to(on.device)
    if on.cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    scheduler = build_scheduler(
        cfg.scheduler, optimizer, step_size=cfg.step_size, gamma=cfg.gamma, epochs=run.max_epochs
    )

    identity = checkpoint_identity(cfg, data_cfg, run.seed, run.max_epochs)
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
        data_key=feature_data_key(data_cfg, run),
        batch_size=cfg.eval_batch_size,
        device=on.device,
        bf16=on.bf16,
    )
    forward = compiled_forward(net, cfg.compile_mode) if cfg.compile else None
    # Leaving the block waits for the write in flight, however the trial ends.
    with CheckpointWriter(cfg.checkpoint_async) as writer:

        def checkpoint(epoch: int) -> None:
            writer.save(
                run.checkpoint_dir,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                epoch=epoch,
                config=identity,
                history=run.history,
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
                forward=forward,
            )
            if scheduler is not None:
                scheduler.step()
            batch_size = cfg.eval_batch_size
            metrics |= evaluate(net, criterion, inputs, batch_size=batch_size, on=on, forward=forward)
            if test_inputs is not None:  # the whole model on the test images (never a feature cache)
                test = evaluate(model, criterion, test_inputs, batch_size=cfg.eval_batch_size, on=on)
                metrics |= {"test_" + name.removeprefix("val_"): value for name, value in test.items()}
            metrics["lr"] = lr
            try:
                stop = run.report(epoch, metrics)
            except optuna.TrialPruned:
                checkpoint(epoch)  # the trial ends here: its checkpoint holds where it ended
                raise
            if stop or checkpoint_due(epoch, run.max_epochs, cfg.checkpoint_every):
                checkpoint(epoch)
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
    # hpo worker --fuse K: report 000's attribute MLP trials and the CNNs' scratch/finetune/features
    # trials on the CPU train as one batched model (objectives/vision/_fused_mlp.py, _fused_cnn.py,
    # _fused_frozen.py); every other trial runs alone, with the reason (why_not_fusable).
    fused_train=train_fused,
    may_differ=ATTRIBUTE_MLP_MAY_DIFFER,
    why_not_fusable=why_not_fusable,
)
