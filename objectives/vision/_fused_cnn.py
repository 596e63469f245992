"""Batched forward pass of the torchvision CNNs of ``image_classifier`` for fused trials (``hpo worker
--fuse K``, see :mod:`hpo._fused` and :mod:`objectives.vision._fused_mlp`, whose trainer runs it).

K members of one architecture (resnet18, resnet50, alexnet, vgg16, efficientnet_b0, resnet18_mlp
with ``transfer: scratch`` or ``finetune``, and with ``transfer: features``, whose frozen prefix
runs once for the group: :mod:`objectives.vision._fused_frozen`) run as one: ``torch.func.vmap`` over
``torch.func.functional_call`` of one member's module with the stacked ``(K, ...)`` parameters and
buffers of :class:`hpo._fused.Stack` and the shared input batch (``in_dims=(0, 0, None)``). What
each member sees is its own:

* outputs and gradients: vmap batches the convolutions and matmuls over the members' weights;
* batch norm: each member normalises with its own batch statistics, and in training mode its
  running statistics (and ``num_batches_tracked``) are updated in place in the stacked buffers,
  as ``nn.BatchNorm2d`` updates the unfused member's;
* dropout (AlexNet/VGG's classifier, the head's ``dropout``) and EfficientNet's stochastic depth:
  ``randomness="same"`` draws one mask of the unfused member's shape from the global RNG, which
  is every member's unfused mask on the CPU (same study seed, same RNG consumption). CUDA's
  dropout is a fused kernel that draws differently, so fusing is CPU-only (``why_not_fusable``).

Augmentation is applied once per batch by the trainer and shared (its generator is seeded from
the study seed and the epoch, as every member's unfused run seeds it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

# The models whose trials fuse with this forward pass, and the transfer modes: every parameter
# trains, or (features) a frozen prefix shared by the members runs once and the rest is stacked.
# classifier / classifier_all freeze layers between trainable ones, which the stack cannot skip.
FUSABLE_CNNS = ("resnet18", "resnet50", "alexnet", "vgg16", "efficientnet_b0", "resnet18_mlp")
FUSABLE_TRANSFER = ("scratch", "finetune", "features")


def stacked_forward(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    training: bool,
    per_member: bool = False,
) -> torch.Tensor:
    """The K members' logits (K, B, C) for a shared batch ``x`` (B, ...), or with ``per_member``
    each member's own batch ``x`` (K, B, ...); ``model`` is one member (the architecture, in the
    mode the trainer set: ``training`` must agree with it), ``params`` / ``buffers`` the stacked
    ones by name. Buffers are updated in place (batch norm in training)."""
    if model.training != training:
        raise ValueError(f"the reference model is in {'training' if model.training else 'eval'} mode")

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(model, (p, b), (inp,))
        return out

    batched = vmap(one, in_dims=(0, 0, 0 if per_member else None), randomness="same")
    logits: torch.Tensor = batched(dict(params), dict(buffers), x)
    return logits


def why_not_fusable_cnn(config: Mapping[str, Any], device: str) -> str | None:
    """Why a CNN trial (its validated configuration) cannot fuse, or None; the options common to
    every fused trial (must-equal / may-differ classification) are checked by the caller."""
    model = config.get("model")
    if model not in FUSABLE_CNNS:
        return f"model {model} has no fused trainer (mlp, attribute_mlp and {', '.join(FUSABLE_CNNS)} do)"
    if config.get("transfer") not in FUSABLE_TRANSFER:
        return (
            f"transfer {config.get('transfer')} freezes layers of {model} between trainable ones, "
            "which a fused group cannot leave out of its stacked parameters; scratch, finetune and "
            "features fuse"
        )
    if not device.startswith("cpu"):
        return (
            f"fused {model} trials run on the CPU only: CUDA draws dropout and stochastic-depth masks "
            "with fused kernels that one shared batched draw does not match (not built or measured)"
        )
    if config.get("loss") not in ("auto", "cross_entropy", "bce"):
        return f"loss {config.get('loss')} cannot be fused (auto, cross_entropy or bce can)"
    if config.get("compile") or config.get("precision") == "bf16":
        return "compile and bf16 cannot be fused"
    return None
