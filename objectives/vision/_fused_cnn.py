"""Forward pass of the torchvision CNNs of ``image_classifier`` for fused trials (``hpo worker
--fuse K``, see :mod:`hpo._fused` and :mod:`objectives.vision._fused_mlp`, whose trainer runs it).

K members of one architecture (resnet18, resnet50, alexnet, vgg16, efficientnet_b0, resnet18_mlp
with ``transfer: scratch`` or ``finetune``; with ``transfer: features``, whose frozen prefix
runs once for the group: :mod:`objectives.vision._fused_frozen`; AlexNet and VGG16 with
``transfer: classifier`` or ``classifier_all``, whose frozen FC layers each member runs in its own
forward pass) run on the group's shared batch, in one of two ways:

* :func:`in_turn_steps` (training) and :func:`in_turn_forward` (evaluation), what the fused
  trainer runs (on the CPU): each member's own module, one member after another (nothing
  stacked), in training each member's whole step (forward, its own loss, backward, its own
  optimizer step) before the next member's. Each member computes exactly its unfused step,
  and draws its dropout and stochastic-depth masks from the RNG state the batch started with,
  as its unfused run does. The group shares the batches, their augmentation (applied once per
  batch, its generator seeded from the study seed and the epoch as every member's unfused run
  seeds it), the data and the process;
* :func:`stacked_forward`: ``torch.func.vmap`` over ``functional_call`` with the stacked
  parameters (``in_dims=(0, 0, None)``, ``randomness="same"``: one mask of the unfused member's
  shape, every member's unfused mask on the CPU), so convolutions become grouped ones and matmuls
  batched ones. On a CPU those train slower than K plain ones, so the trainer runs members in
  turn there; on a GPU, where batching would pay, fused CNNs are refused (CUDA draws dropout
  masks with fused kernels that one shared batched draw does not match; not built or measured:
  no GPU was lent). Kept, and tested to agree with the in-turn pass, for that case.

Either way each member's outputs, gradients and batch-norm statistics (``num_batches_tracked``
included) are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from objectives.vision.models import ImageClassifier

# The models whose trials fuse with this forward pass, and the transfer modes: every parameter
# trains; or (features) a frozen prefix shared by the members runs once, and the rest trains; or
# (classifier / classifier_all) frozen FC layers sit between or after trainable ones: run in turn,
# each member's own module runs them and only its trainable parameters are stepped
# (hpo._fused.Stack), which stacked_forward's stacked leaves cannot leave out.
FUSABLE_CNNS = ("resnet18", "resnet50", "alexnet", "vgg16", "efficientnet_b0", "resnet18_mlp")
FUSABLE_TRANSFER = ("scratch", "finetune", "features", "classifier", "classifier_all")


def stacked_forward(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    training: bool,
    per_member: bool = False,
) -> torch.Tensor:
    """The K members' logits (K, B, C) for a shared batch ``x`` (B, ...), or with ``per_member``
    each member's own batch ``x`` (K, B, ...), as one batched model (vmap); ``model`` is one
    member (the architecture, in the mode the trainer set: ``training`` must agree with it),
    ``params`` / ``buffers`` the stacked ones by name. Buffers are updated in place (batch norm
    in training). The fused trainer runs :func:`in_turn_forward` on the CPU instead."""
    _check_mode(model, training)

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(model, (p, b), (inp,))
        return out

    batched = vmap(one, in_dims=(0, 0, 0 if per_member else None), randomness="same")
    logits: torch.Tensor = batched(dict(params), dict(buffers), x)
    return logits


def in_turn_forward(
    models: Sequence[nn.Module], x: torch.Tensor, training: bool, per_member: bool = False
) -> torch.Tensor:
    """What :func:`stacked_forward` returns, computed by each member's own module (``models``,
    in the mode the trainer set), one after another: each draws its dropout and
    stochastic-depth masks from the RNG state the batch started with, so from the state its
    unfused run has there, and the RNG ends where one unfused step leaves it. The members'
    gradients land on their own parameters (:class:`hpo._fused.Stack` with ``in_turn``).

    Why on the CPU: there vmap turns a convolution over K members' weights into a grouped
    convolution, whose backward pass is slower than K plain ones (ResNet-18 at 32 px, K=4:
    1.4-1.6x; AlexNet's 9216 x 4096 classifier as batched matmuls: 2.4x; ``benchmarks/fused_worker.py``
    measured whole fused trials at 0.86x of unfused ones). Run in turn, each member computes what
    its unfused step computes, and the group still shares its batches, their augmentation and
    one process."""
    rng = torch.get_rng_state()
    logits = []
    for k, model in enumerate(models):
        _check_mode(model, training)
        torch.set_rng_state(rng)
        logits.append(model(x[k] if per_member else x))
    return torch.stack(logits)


def in_turn_steps(
    models: Sequence[ImageClassifier],
    x: torch.Tensor,
    loss_of: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    step: Callable[[int], None],
    detach_heads: Sequence[bool],
    per_member: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One training step of each member on the batch ``x``, one member after another, as its
    unfused step runs: its own ``forward_with_features`` from the RNG state the batch started
    with (``detach_heads[k]``: member k's head learns from its detached embedding, as a triplet
    run's does), its loss ``loss_of(k, logits, features)`` (report 003's center loss moves the
    member's centres there), its backward pass and ``step(k)`` (its optimizer step, which frees
    its gradients). Returns each member's loss and logits, detached; the RNG ends where one
    unfused step leaves it.

    Why each member's whole step before the next member's forward pass, not one backward pass of
    the summed losses and one step of all: the results are the same, but one member's
    activations and gradients are alive at a time instead of K members' (on a CPU the larger
    allocations are returned to the system when freed and faulted back in at every step: K=4
    ResNet-18s at 32 px trained 1.27x slower than K unfused runs that way)."""
    rng = torch.get_rng_state()
    losses, logits = [], []
    for k, model in enumerate(models):
        _check_mode(model, True)
        torch.set_rng_state(rng)
        out, features = model.forward_with_features(x[k] if per_member else x, detach_head=detach_heads[k])
        loss = loss_of(k, out, features)
        loss.backward()
        step(k)
        losses.append(loss.detach())
        logits.append(out.detach())
    return losses, logits


def _check_mode(model: nn.Module, training: bool) -> None:
    if model.training != training:
        raise ValueError(f"the reference model is in {'training' if model.training else 'eval'} mode")


def why_not_fusable_cnn(config: Mapping[str, Any], device: str) -> str | None:
    """Why a CNN trial (its validated configuration) cannot fuse, or None; the options common to
    every fused trial (must-equal / may-differ classification) are checked by the caller."""
    model = config.get("model")
    if model not in FUSABLE_CNNS:
        return f"model {model} has no fused trainer (mlp, attribute_mlp and {', '.join(FUSABLE_CNNS)} do)"
    if config.get("transfer") not in FUSABLE_TRANSFER:
        return f"transfer {config.get('transfer')} cannot be fused ({', '.join(FUSABLE_TRANSFER)} can)"
    if not device.startswith("cpu"):
        return (
            f"fused {model} trials run on the CPU only: CUDA draws dropout and stochastic-depth masks "
            "with fused kernels that one shared batched draw does not match (not built or measured)"
        )
    if config.get("compile") or config.get("precision") == "bf16":
        return "compile and bf16 cannot be fused"
    return None
