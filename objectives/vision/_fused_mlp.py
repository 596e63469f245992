"""Batched forward pass of report 000's MLP (``model: mlp``) for fused trials (see :mod:`hpo._fused`).

K members of one architecture (an :class:`~objectives.vision.models.ImageClassifier` with an
``Identity`` backbone, a :class:`~objectives.vision.models.ResidualMLP` trunk and a Dropout +
Linear head) run as one: the first layer is one wide matmul of the shared input against all
members' weights, the others batched matmuls; batch norm normalises the K members' H features as
K * H channels of one ``F.batch_norm`` call, so each member's batch statistics, running
statistics (updated in place in the stacked buffers) and affine parameters are its own. The
head's dropout mask is drawn once per batch, as the unfused member draws it (CPU).

This is the model part only: the vision training loop (``objectives.vision.train``) has no fused
counterpart yet.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hpo._fused import dropout_noise
from objectives.vision.models import LEAKY_SLOPE, ImageClassifier, ResidualMLP


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, in) shared or (K, B, in) per member -> (K, B, out)."""
    k, out = weight.shape[0], weight.shape[1]
    if h.dim() == 2:  # the shared input: one wide matmul against every member's weights
        wide = F.linear(h, weight.reshape(k * out, -1), bias.reshape(k * out))
        return wide.view(h.shape[0], k, out).transpose(0, 1)
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _batch_norm(
    h: torch.Tensor,
    layer: nn.BatchNorm1d,
    prefix: str,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    training: bool,
) -> torch.Tensor:
    """Each member's BatchNorm1d over its own (B, H) slice of ``h`` (K, B, H)."""
    k, b, width = h.shape
    channels = h.transpose(0, 1).reshape(b, k * width)  # member-major channels: (B, K * H)
    running_mean = buffers[f"{prefix}.running_mean"]
    running_var = buffers[f"{prefix}.running_var"]
    momentum = layer.momentum
    if training:
        buffers[f"{prefix}.num_batches_tracked"].add_(1)
        if momentum is None:  # a cumulative average, as BatchNorm computes it
            momentum = 1.0 / float(buffers[f"{prefix}.num_batches_tracked"][0])
    out = F.batch_norm(
        channels,
        running_mean.view(-1),  # views: the stacked buffers are updated in place
        running_var.view(-1),
        params[f"{prefix}.weight"].reshape(-1),
        params[f"{prefix}.bias"].reshape(-1),
        training,
        momentum if momentum is not None else 0.0,
        layer.eps,
    )
    return out.view(b, k, width).transpose(0, 1)


def residual_mlp_forward(
    model: ImageClassifier,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """The K members' logits (K, B, C) for a shared batch ``x``; ``model`` is one member (the
    architecture), ``params`` / ``buffers`` the stacked ones by name (:class:`hpo._fused.Stack`)."""
    trunk = model.trunk
    if not isinstance(model.backbone, nn.Identity) or not isinstance(trunk, ResidualMLP):
        raise TypeError("only report 000's MLP (model: mlp) has a fused forward pass")

    def layer(h: torch.Tensor, prefix: str, block: nn.Module) -> torch.Tensor:
        if not isinstance(block, nn.Sequential) or not isinstance(block[1], nn.BatchNorm1d):
            raise TypeError("a ResidualMLP layer is Linear + BatchNorm1d + LeakyReLU")
        h = _linear(h, params[f"{prefix}.0.weight"], params[f"{prefix}.0.bias"])
        h = _batch_norm(h, block[1], f"{prefix}.1", params, buffers, training)
        return F.leaky_relu(h, LEAKY_SLOPE)

    h = layer(x.flatten(1), "trunk.inp", trunk.inp)
    for index, block in enumerate(trunk.blocks):
        h = h + layer(h, f"trunk.blocks.{index}", block)
    dropout = model.head[0]
    if training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        h = h * dropout_noise(h.shape[-2:], dropout.p, h)  # the unfused member's (B, H) mask
    return _linear(h, params["head.1.weight"], params["head.1.bias"])
