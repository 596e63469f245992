"""Batched forward pass of report 000's MLP (``model: mlp``) for fused trials (see :mod:`hpo._fused`).

K members of one architecture (an :class:`~objectives.vision.models.ImageClassifier` with an
``Identity`` backbone, a :class:`~objectives.vision.models.ResidualMLP` trunk and a Dropout +
Linear head) run as one: the first layer is one wide matmul of the shared input against all
members' weights, the others batched matmuls; batch norm normalises the K members' H features as
K * H channels of one ``F.batch_norm`` call, so each member's batch statistics, running
statistics (updated in place in the stacked buffers) and affine parameters are its own. The
head's dropout mask is drawn once per batch, as the unfused member draws it (CPU).

:func:`train_fused` is the fused trainer of ``image_classifier`` (CPU): of report 000's attribute
MLP (``model: attribute_mlp``, and ``model: mlp``, the same network on flattened pixels, with the
forward pass above) and of the torchvision CNNs with every
parameter trainable (``transfer: scratch`` or ``finetune``, each member's own module in turn:
:func:`objectives.vision._fused_cnn.in_turn_forward`) or a frozen backbone (``transfer: features``:
the frozen part runs once for the group, :mod:`objectives.vision._fused_frozen`; the trainable rest
through the MLP forward pass above or ``in_turn_forward``).
Each member is set up as :func:`objectives.vision.train.train` sets the unfused trial up, and
each epoch replays its training loop (seeded order, augmentation and dropout, batch-norm batches, the loss,
``train_loss``/``train_acc``, the schedule) and evaluation (``val_loss``/``val_acc``/``val_top5``
or ``val_map``, ``lr``) for all members at once, with the unfused loop's own metric code
(``add_train_batch``, ``val_sums``). Checkpoints follow each member's ``checkpoint_every`` (and
its last epoch), in the unfused format and identity, so either run resumes the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpo._fused import (
    Member,
    Stack,
    batched_linear,
    dropout_noise,
    shared_linear,
    train_group,
    why_not_fusable_runs,
)
from hpo.objective import TrialRun
from hpo.training import build_scheduler, epoch_seed, load_checkpoint, seed_everything
from objectives.vision._fused_cnn import (
    in_turn_forward,
    in_turn_steps,
    stacked_forward,
    why_not_fusable_cnn,
)
from objectives.vision._fused_frozen import FrozenPrefix, share_frozen_prefix
from objectives.vision._inputs import (
    Inputs,
    held_out_inputs,
    make_criterion,
    make_inputs,
    split_ignore,
    with_ignore,
)
from objectives.vision.augment import Augmentation
from objectives.vision.data import DataConfig, load_image_data
from objectives.vision.metrics import EpochMeter
from objectives.vision.models import LEAKY_SLOPE, MLP_MODELS, ImageClassifier, ResidualMLP

# The two sets classify the options for every fused image_classifier trial (attribute MLP and CNNs).
# Every option of ImageClassifierConfig is in exactly one of the two sets below (tests/test_vision_train.py
# checks it against the config's fields). An option in neither, i.e. one added to the config and not
# classified here, fuses only at its default value (why_not_fusable), so it is never silently dropped.

# What may differ between fused members: the optimizer's and the schedule's hyperparameters (each
# member keeps its own optimizer and schedule), the loss and its weights (each member's own
# criterion on its own logits and embedding; report 003's center loss keeps its centres in the
# member's own model, and a group with a center or triplet member runs its members in turn), and
# options with no effect on a fused group:
# checkpoint_every and checkpoint_async (each member's own, honoured by hpo._fused.train_group;
# neither changes what is trained), feature_cache (cached and recomputed features are the same run
# within rounding; a transfer: features group uses the cache only when every member allows it),
# compile_mode (compile: true is
# refused) and precision (bf16 is refused and fusing is CPU-only, where auto is fp32).
ATTRIBUTE_MLP_MAY_DIFFER = frozenset(
    {"lr", "weight_decay", "momentum", "nesterov", "scheduler", "step_size", "gamma"}
    | {"loss", "center_loss_lambda", "center_alpha", "triplet_margin"}
    | {"checkpoint_every", "checkpoint_async", "feature_cache", "compile_mode", "precision"}
)
# What must be equal: the architecture, the batches, the loss and the evaluation the fused trainer
# replays for every member, and the options it only fuses at some values (why_not_fusable: model,
# compile, test_metrics, transfer) or that do not apply to the attribute MLP (pretrained,
# encoder_checkpoint, frozen_mode, augment), which a CNN group shares (one augmented batch for all
# members; the same initial weights).
ATTRIBUTE_MLP_MUST_EQUAL = frozenset(
    {"model", "mlp_width", "mlp_layers", "dropout", "target_attribute"}
    | {"optimizer", "batch_size", "eval_batch_size", "test_metrics", "compile"}
    | {"transfer", "pretrained", "encoder_checkpoint", "frozen_mode", "augment"}
)


# The members' activations are (B, K, H), member-minor: batch norm's K * H channels are then a view
# of them, where a (K, B, H) layout costs two strided copies per layer and their backward passes.


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, in) shared or (B, K, in) per member -> (B, K, out)."""
    if h.dim() == 2:
        return shared_linear(h, weight, bias)
    return batched_linear(h.transpose(0, 1), weight, bias).transpose(0, 1)


def _batch_norm(
    h: torch.Tensor,
    layer: nn.BatchNorm1d,
    prefix: str,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    training: bool,
) -> torch.Tensor:
    """Each member's BatchNorm1d over its own (B, H) slice of ``h`` (B, K, H)."""
    b, k, width = h.shape
    running_mean = buffers[f"{prefix}.running_mean"]
    running_var = buffers[f"{prefix}.running_var"]
    momentum = layer.momentum
    if training:
        buffers[f"{prefix}.num_batches_tracked"].add_(1)
        if momentum is None:  # a cumulative average, as BatchNorm computes it
            momentum = 1.0 / float(buffers[f"{prefix}.num_batches_tracked"][0])
    out = F.batch_norm(
        h.reshape(b, k * width),  # member-major channels
        running_mean.view(-1),  # views: the stacked buffers are updated in place
        running_var.view(-1),
        params[f"{prefix}.weight"].reshape(-1),
        params[f"{prefix}.bias"].reshape(-1),
        training,
        momentum if momentum is not None else 0.0,
        layer.eps,
    )
    return out.view(b, k, width)


def residual_mlp_forward(
    model: ImageClassifier,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    training: bool,
    per_member: bool = False,
) -> torch.Tensor:
    """The K members' logits (K, B, C) for a shared batch ``x`` (or, ``per_member``, each member's
    own: (K, B, ...)); ``model`` is one member (the architecture), ``params`` / ``buffers`` the
    stacked ones by name (:class:`hpo._fused.Stack`). Also the trainable rest of ``resnet18_mlp``
    on its frozen encoder's features (:mod:`objectives.vision._fused_frozen`)."""
    trunk = model.trunk
    if not isinstance(model.backbone, nn.Identity) or not isinstance(trunk, ResidualMLP):
        raise TypeError("only report 000's MLP (Identity backbone, ResidualMLP trunk) has this forward pass")

    def layer(h: torch.Tensor, prefix: str, block: nn.Module) -> torch.Tensor:
        if not isinstance(block, nn.Sequential) or not isinstance(block[1], nn.BatchNorm1d):
            raise TypeError("a ResidualMLP layer is Linear + BatchNorm1d + LeakyReLU")
        h = _linear(h, params[f"{prefix}.0.weight"], params[f"{prefix}.0.bias"])
        h = _batch_norm(h, block[1], f"{prefix}.1", params, buffers, training)
        return F.leaky_relu(h, LEAKY_SLOPE)

    h = layer(x.flatten(2).transpose(0, 1) if per_member else x.flatten(1), "trunk.inp", trunk.inp)
    for index, block in enumerate(trunk.blocks):
        h = h + layer(h, f"trunk.blocks.{index}", block)
    dropout = model.head[0]
    if training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        # the unfused member's (B, H) mask, the same for every member
        h = h * dropout_noise((h.shape[0], h.shape[2]), dropout.p, h).unsqueeze(1)
    return _linear(h, params["head.1.weight"], params["head.1.bias"]).transpose(0, 1)


def reference_of(model: nn.Module) -> ImageClassifier:
    """A fused member's trained module, as the image classifier it is."""
    if not isinstance(model, ImageClassifier):
        raise TypeError("a fused image_classifier member is an ImageClassifier")
    return model


def _is_residual_mlp(model: ImageClassifier) -> bool:
    return isinstance(model.backbone, nn.Identity) and isinstance(model.trunk, ResidualMLP)


def why_not_fusable(config: Mapping[str, Any], device: str) -> str | None:
    """Why a trial of the image classifier (its validated configuration) cannot fuse, or None:
    the residual MLPs (``attribute_mlp`` on attribute rows, ``mlp`` on flattened pixels) and the
    CNNs (:func:`objectives.vision._fused_cnn.why_not_fusable_cnn`) can."""
    model = config.get("model")
    if model not in MLP_MODELS:
        return why_not_fusable_cnn(config, device) or _unclassified_option(config)
    if not device.startswith("cpu"):
        return f"fused {model} trials match the unfused dropout masks on the CPU only"
    # test_metrics needs test images, which attribute rows are not: the trial fails alone, saying so
    if model == "attribute_mlp" and config.get("test_metrics"):
        return "test_metrics cannot be fused with attribute_mlp (attribute rows have no test images)"
    if config.get("compile") or config.get("precision") == "bf16":
        return "compile and bf16 cannot be fused"
    return _unclassified_option(config)


def _unclassified_option(config: Mapping[str, Any]) -> str | None:
    """Why not, where an option that this module does not classify is not at its default."""
    from objectives.vision.train import ImageClassifierConfig  # imports this module

    fields = ImageClassifierConfig.model_fields
    known = ATTRIBUTE_MLP_MAY_DIFFER | ATTRIBUTE_MLP_MUST_EQUAL
    for name in sorted(set(config) - known):
        default = fields[name].default if name in fields else None
        if name not in fields or config[name] != default:
            return (
                f"option {name}={config[name]!r} is not known to the fused image_classifier trainer "
                "(it fuses only at its default)"
            )
    return None


def _member(run: TrialRun) -> tuple[Member, Any]:
    """One trial set up as ``objectives.vision.train.train`` sets it up (seeded weights, its own
    optimizer and schedule, restored from its checkpoint); with its inputs."""
    from objectives.vision.train import _optimizer, _parse_config, build_trial_model, checkpoint_identity

    cfg = _parse_config(run.config)
    data_cfg = DataConfig(**run.data)
    data = load_image_data(data_cfg, run.seed, cache=run.cache, device=run.device, test=cfg.test_metrics)
    inputs = make_inputs(cfg, data)
    test_inputs = held_out_inputs(cfg, data, inputs)  # test_metrics: true (report 004's test list)
    criterion = make_criterion(cfg, inputs)
    seed_everything(run.seed)
    model = build_trial_model(cfg, inputs, criterion).to(run.device)
    optimizer = _optimizer(cfg, model)
    scheduler = build_scheduler(
        cfg.scheduler, optimizer, step_size=cfg.step_size, gamma=cfg.gamma, epochs=run.max_epochs
    )
    identity = checkpoint_identity(cfg, data_cfg, run.seed, run.max_epochs)  # compile is refused
    start_epoch = 1
    restored = load_checkpoint(
        run.checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler, config=identity
    )
    if restored is not None:
        start_epoch = run.resume(restored[1]) + 1
    member = Member(
        run,
        model,
        optimizer,
        scheduler,
        identity,
        next_epoch=start_epoch,
        checkpoint_when_pruned=True,
        checkpoint_every=cfg.checkpoint_every,
        checkpoint_async=cfg.checkpoint_async,
    )
    return member, (cfg, inputs, test_inputs, criterion)


def train_fused(runs: Sequence[TrialRun], on_leave: Callable[[Member], None] | None = None) -> list[Member]:
    """Train image-classifier trials that differ only in ``ATTRIBUTE_MLP_MAY_DIFFER`` as one group:
    report 000's attribute MLP (:func:`residual_mlp_forward`) or a torchvision CNN
    (:func:`objectives.vision._fused_cnn.in_turn_forward`). Each epoch replays the unfused loop
    (``objectives.vision.train``: seeded order, augmentation and dropout, the loss, ``train_loss`` /
    ``train_acc``, the schedule, the evaluation in ``eval_batch_size`` batches, ``lr``) for all
    members at once; each member's loss is its own mean loss, summed over members."""
    from objectives.vision.train import (
        Device,
        _batches,
        _model_input,
        _parse_config,
        add_train_batch,
        feature_data_key,
        val_sums,
    )

    reason = why_not_fusable_runs(
        runs, ATTRIBUTE_MLP_MAY_DIFFER, lambda r: _parse_config(r.config).model_dump()
    )
    for run in runs:
        reason = reason or why_not_fusable(_parse_config(run.config).model_dump(), run.device)
    if reason is not None:
        raise ValueError(f"these image_classifier trials cannot be fused: {reason}")
    built = [_member(run) for run in runs]
    members = [member for member, _ in built]
    cfg, inputs, test_inputs, _ = built[0][1]  # equal for every member: same data, seed, options
    # report 003's losses need each member's embedding (and its own centres): members run in turn
    embedding_losses = any(setup[3].name in ("center", "triplet") for _, setup in built)
    on = Device.for_run(runs[0].device, cfg.precision)
    augmentation = Augmentation.preset(cfg.augment) if inputs.images else None
    frozen: FrozenPrefix | None = None  # transfer: features: the frozen prefix runs once for the group
    if cfg.transfer == "features":
        inputs, frozen = share_frozen_prefix(
            members,
            inputs,
            feature_cache=all(_parse_config(run.config).feature_cache == "auto" for run in runs),
            augmentation=augmentation,
            cache=runs[0].cache,
            data_key=feature_data_key(DataConfig(**runs[0].data), runs[0]),
            batch_size=cfg.eval_batch_size,
            device=on.device,
        )
    # The trainable rest on the frozen prefix: report 000's MLP (resnet18_mlp) runs as batched
    # matmuls; any other (AlexNet/VGG's classifier, a ResNet's head) as the CNNs do.
    rest = members[0].trained
    mlp_rest = frozen is not None and isinstance(rest, ImageClassifier) and _is_residual_mlp(rest)
    # CNNs on the CPU: each member's own module in turn (vmapped convolutions are slower there
    # than K plain ones; so were AlexNet's classifier layers as batched matmuls: 0.80-0.91x of a
    # plain worker, against 1.15-1.23x in turn, benchmarks/fused_worker.py); the MLP forward
    # passes are batched matmuls, which pay, except where a member's loss needs its embedding.
    batched_mlp = (cfg.model in MLP_MODELS or mlp_rest) and not embedding_losses
    in_turn = on.device.type == "cpu" and not batched_mlp
    whole = {id(m.trained): m.model for m in members}  # the trained module -> the member's whole model
    criterion_of = {id(member.trained): setup[3] for member, setup in built}  # each member's own loss
    pending: dict[int, dict[str, float]] = {}  # each model's train_acc and lr, until evaluated

    def reference(stack: Stack) -> ImageClassifier:
        return reference_of(stack.reference)

    def set_mode(stack: Stack, training: bool) -> None:
        for m in stack.models:
            m.train(training)
            whole[id(m)].train(training)  # its frozen prefix too (frozen_mode), outside the stack
        if frozen is not None:
            frozen.begin(stack.models)

    def forward(stack: Stack, x: torch.Tensor, training: bool, images: bool) -> torch.Tensor:
        """Every member's logits for the input batch ``x`` (images through the shared frozen prefix)."""
        model = reference(stack)
        per_member = False
        if frozen is not None and images:
            x, per_member = frozen(x)
        if batched_mlp:  # model: mlp is the same network on pixels
            return residual_mlp_forward(model, stack.params, stack.buffers, x, training, per_member)
        if in_turn:
            return in_turn_forward(stack.models, x, training, per_member)
        return stacked_forward(model, stack.params, stack.buffers, x, training, per_member)

    def steps_in_turn(
        stack: Stack, x: torch.Tensor, y: torch.Tensor, ignore: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each member's training step on a batch, each member's own module in turn: its own
        criterion on its own logits and embedding (a triplet member's head on its detached
        embedding, a center member's own centres moved as in its unfused step), its own
        optimizer step. Each member's loss and logits."""
        per_member = False
        if frozen is not None and inputs.images:
            x, per_member = frozen(x)
        models = [reference_of(m) for m in stack.models]
        criteria = [criterion_of[id(m)] for m in models]

        def loss_of(k: int, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            return criteria[k](logits, features, y, models[k].center_loss, ignore=ignore)

        detach = [c.name == "triplet" for c in criteria]
        return in_turn_steps(models, x, loss_of, stack.step_member, detach, per_member)

    def train_epoch(stack: Stack, epoch: int) -> list[float]:
        set_mode(stack, True)
        seed = epoch_seed(runs[0].seed, epoch)
        torch.manual_seed(seed)  # dropout masks, as the unfused epoch draws them
        order = torch.randperm(len(inputs.train_y), generator=torch.Generator().manual_seed(seed))
        generator = on.generator(seed) if augmentation is not None and augmentation.active else None
        meters = [EpochMeter() for _ in range(stack.size)]
        lrs = [float(opt.param_groups[0]["lr"]) for opt in stack.optimizers]
        targets, width = with_ignore(inputs.train_y, inputs.train_ignore)
        # a last batch of one sample is skipped, as unfused (batch norm cannot normalise it)
        for start, stop in _batches(len(order), cfg.batch_size, drop_single=True):
            index = order[start:stop]
            y, ignore = split_ignore(targets[index], width)
            x = _model_input(inputs.train_x[index], inputs.images, on, augmentation, generator)
            if in_turn:
                losses, logits = steps_in_turn(stack, x, y, ignore)
            else:
                stacked = forward(stack, x, True, inputs.images)
                # each member's own mean loss: their sum's gradient is every member's own gradient
                losses = [
                    criterion_of[id(m)](stacked[k], stacked[k], y, None, ignore=ignore)
                    for k, m in enumerate(stack.models)
                ]
                torch.stack(losses).sum().backward()
                stack.step()
                logits = list(stacked.unbind())
            for k, meter in enumerate(meters):
                add_train_batch(meter, losses[k], logits[k], y, ignore, inputs.multilabel)
        if frozen is not None:
            frozen.end()  # members sharing a prefix get its updated batch-norm statistics
        out = []
        for k, m in enumerate(stack.models):
            metrics = meters[k].compute()
            pending[id(m)] = {"train_acc": metrics["train_acc"], "lr": lrs[k]}
            out.append(metrics["train_loss"])
        return out

    @torch.no_grad()
    def evaluate(stack: Stack) -> list[dict[str, float]]:
        set_mode(stack, False)

        def all_logits(part: Inputs) -> torch.Tensor:  # every member's, for every sample of part.val_x
            n = len(part.val_y)
            logits = torch.empty(stack.size, n, part.num_outputs, dtype=torch.float32)
            for start, stop in _batches(n, cfg.eval_batch_size, drop_single=False):
                x = _model_input(part.val_x[start:stop], part.images, on, None, None)
                logits[:, start:stop] = forward(stack, x, False, part.images).float()
            return logits

        val = all_logits(inputs)
        test = all_logits(test_inputs) if test_inputs is not None else None
        out = []
        for k, m in enumerate(stack.models):
            criterion = criterion_of[id(m)]
            metrics = val_sums(val[k], criterion, inputs, on).compute()
            if test is not None and test_inputs is not None:  # named as the unfused run names them
                held_out = val_sums(test[k], criterion, test_inputs, on).compute()
                metrics |= {"test_" + name.removeprefix("val_"): value for name, value in held_out.items()}
            out.append(metrics | pending.pop(id(m)))
        return out

    train_group(members, train_epoch, evaluate, on_leave, in_turn=in_turn)
    return members
