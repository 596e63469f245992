"""Image classifiers: torchvision backbones with a new head, and report 000's residual MLP.

Every model is an :class:`ImageClassifier`: ``backbone`` maps an input batch to a feature vector,
an optional ``trunk`` (report 000's MLP head) transforms it, and ``head`` (optional dropout, then
a new ``Linear``) maps it to one logit per class. The feature vector entering ``head`` (the
embedding) is what center loss pulls towards its class centre and triplet loss acts on.

Transfer modes (report 004) say which parts train:

* ``scratch``: random initialisation, everything trains;
* ``finetune``: ImageNet weights, everything trains;
* ``features``: the convolutional part is frozen; the classifier (AlexNet/VGG's hidden FC layers,
  report 000's MLP head, and the new last layer) trains;
* ``classifier``: AlexNet/VGG's hidden FC layers are frozen; the convolutional part and the new
  last layer train (only models that have hidden FC layers): report 004's "all FC frozen except
  FC[6]";
* ``classifier_all``: every FC layer is frozen, the new (randomly initialised) last layer included;
  only the convolutional part trains (report 004's "all FC frozen", table 9).

Frozen parts get ``requires_grad=False``. What they do in training mode is ``frozen_mode``:
``train`` (the default, what the reports did: only ``requires_grad=False``, so dropout in frozen FC
layers stays on and frozen batch-norm layers keep adapting their running statistics) or ``eval``
(frozen parts stay in eval mode: no dropout, batch-norm statistics fixed).

``in_channels: 1`` (report 003's greyscale input) replaces the first convolution (or the MLP's
input width) by a one-channel one: with ImageNet weights its kernel is the sum of the three colour
kernels (a grey image repeated in three channels gives the same response); with random weights, the
first channel's slice of the model's own initialisation. ResNet-18's ``conv1`` then has
64 x 1 x 7 x 7 = 3,136 parameters, as in the report.

``encoder_checkpoint`` initialises the backbone from a model that ``hpo retrain`` saved instead of
ImageNet's weights: report 000's combined model builds on its own fine-tuned ResNet-18, report 002's
scene classifier on its rotation or perturbation pretext model; ``artifact:STUDY`` names the model
``hpo retrain STUDY`` stored in the artifact store (any worker that sees the artifact folder finds
it). Pretrained weights are read from the local torch cache only; :func:`pretrained_weights_file`
names the file and :class:`HpoError` says where to put it when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from hpo.errors import HpoError
from objectives.vision.losses import CenterLoss

ModelName = Literal[
    "alexnet", "vgg16", "resnet18", "resnet50", "efficientnet_b0", "mlp", "attribute_mlp", "resnet18_mlp"
]
TransferMode = Literal["scratch", "finetune", "features", "classifier", "classifier_all"]
FrozenMode = Literal["train", "eval"]

# ImageNet weights the reports used (torchvision's V1 weights for every model).
_WEIGHTS: dict[str, Any] = {
    "alexnet": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    "vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "efficientnet_b0": torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1,
}
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "alexnet": torchvision.models.alexnet,
    "vgg16": torchvision.models.vgg16,
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "efficientnet_b0": torchvision.models.efficientnet_b0,
}
# Models whose classifier has hidden fully connected layers (the ``classifier`` transfer mode).
_HAS_HIDDEN_FC = ("alexnet", "vgg16")
MLP_MODELS = ("mlp", "attribute_mlp")
# Report 000's LeakyReLU slope, also the ``a`` of its Kaiming-normal initialisation.
LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class ModelOptions:
    """What :func:`build_model` needs; the objective fills it from its validated config."""

    name: ModelName
    num_outputs: int
    transfer: TransferMode = "scratch"
    pretrained: bool = False
    dropout: float = 0.0
    mlp_width: int = 256
    mlp_layers: int = 11
    in_features: int | None = None  # mlp / attribute_mlp: length of the (flattened) input
    # resnet18_mlp: its encoder; torchvision models: their initial backbone weights. A saved
    # image_classifier of that model: a path, or artifact:STUDY (see encoder_file).
    encoder_checkpoint: str | None = None
    center_loss: bool = False  # add class centres (report 003's center loss)
    center_alpha: float = 0.5  # the centres' own update rate (Wen et al.)
    in_channels: int = 3  # 1: greyscale input (report 003)
    frozen_mode: FrozenMode = "train"  # frozen parts in training mode (reports) or eval mode


class ResidualMLP(nn.Module):
    """Report 000's MLP body: ``layers`` hidden Linear + BatchNorm + LeakyReLU(0.01) layers.

    The first layer maps ``in_features`` to ``width``; each further layer adds its output to its
    input (a skip connection). Hidden layers use Kaiming-normal initialisation with a=0.01.
    """

    def __init__(self, in_features: int, width: int, layers: int) -> None:
        super().__init__()
        self.inp = self._layer(in_features, width)
        self.blocks = nn.ModuleList(self._layer(width, width) for _ in range(layers - 1))

    @staticmethod
    def _layer(n_in: int, n_out: int) -> nn.Sequential:
        linear = nn.Linear(n_in, n_out)
        nn.init.kaiming_normal_(linear.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
        nn.init.zeros_(linear.bias)
        return nn.Sequential(linear, nn.BatchNorm1d(n_out), nn.LeakyReLU(LEAKY_SLOPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x.flatten(1))
        for block in self.blocks:
            x = x + block(x)
        return x


class ImageClassifier(nn.Module):
    """``head(trunk(backbone(x)))`` with some parts frozen; see the module docstring."""

    def __init__(
        self,
        backbone: nn.Module,
        trunk: nn.Module | None,
        feature_dim: int,
        num_outputs: int,
        dropout: float,
        frozen: tuple[nn.Module, ...] = (),
        xavier_head: bool = False,
        frozen_mode: FrozenMode = "train",
        freeze_head: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.trunk = trunk if trunk is not None else nn.Identity()
        linear = nn.Linear(feature_dim, num_outputs)
        if xavier_head:  # report 000: the last layer is Xavier-normal initialised
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        # Always Dropout + Linear (Dropout(0) is a no-op) so saved state dicts have the same keys.
        self.head = nn.Sequential(nn.Dropout(dropout), linear)
        if freeze_head:  # transfer classifier_all: the new last layer keeps its random weights
            frozen = (*frozen, self.head)
        self.feature_dim = feature_dim
        self.center_loss: CenterLoss | None = None
        self._frozen = frozen
        self.frozen_mode = frozen_mode
        for module in frozen:
            module.requires_grad_(False)

    @property
    def last_layer(self) -> nn.Linear:
        """The new last layer (``head`` is Dropout + this Linear)."""
        return cast(nn.Linear, self.head[1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The vector entering the new last layer (what center loss acts on)."""
        return self.trunk(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_with_features(
        self, x: torch.Tensor, detach_head: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features); ``detach_head``: the head's loss does not reach the features
        (triplet loss: the head is a read-out of an embedding trained by the triplet term alone)."""
        features = self.features(x)
        return self.head(features.detach() if detach_head else features), features

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if self.frozen_mode == "eval":
            for module in self._frozen:  # frozen parts keep their batch-norm statistics and no dropout
                module.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def pretrained_weights_file(name: str) -> Path:
    """Where torchvision looks for ``name``'s ImageNet weights: ``$TORCH_HOME/hub/checkpoints/FILE``."""
    url = _WEIGHTS[name].url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _require_weights(name: str) -> None:
    path = pretrained_weights_file(name)
    if not path.is_file():
        raise HpoError(
            f"pretrained weights for {name} are not in the local torch cache: {path} is missing "
            f"(fix: download {_WEIGHTS[name].url} on a machine with network access and copy it to "
            f"{path.parent}/, or point $TORCH_HOME at a cache that has it, or set pretrained: false; "
            "hpo never downloads weights)"
        )


def check_pretrained_weights(name: str, pretrained: bool, encoder_checkpoint: str | None = None) -> None:
    """Raise :func:`build_model`'s missing-weights :class:`HpoError` now: the objective calls this
    before decoding the dataset, which can take minutes, so a missing file (ImageNet weights, or
    the ``encoder_checkpoint`` file or ``artifact:STUDY`` model) is reported at once."""
    if encoder_checkpoint:  # its own weights, not ImageNet's
        encoder_file(encoder_checkpoint)
        return
    if not pretrained:
        return
    if name == "resnet18_mlp":
        name = "resnet18"
    if name in _WEIGHTS:
        _require_weights(name)


def encoder_file(reference: str) -> Path:
    """The local file ``encoder_checkpoint`` names: ``artifact:STUDY`` (``#topR``) is the model that
    ``hpo retrain STUDY`` stored in the artifact store (:func:`hpo.artifacts.resolve_model_reference`,
    found by any worker that sees the artifact folder); anything else is a path (a relative one was
    made absolute against the study file's folder when the study file was loaded)."""
    from hpo.artifacts import ARTIFACT_PREFIX, resolve_model_reference

    if reference.startswith(ARTIFACT_PREFIX):
        return resolve_model_reference(reference)
    file = Path(reference)
    if not file.is_file():
        raise HpoError(
            f"encoder_checkpoint {reference} does not exist (fix: artifact:STUDY for the model that "
            "`hpo retrain STUDY` stored, or the path of a model.pt it wrote, or remove the setting)"
        )
    return file


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    weights = None
    if pretrained:
        weights = _WEIGHTS[name]
        _require_weights(name)
    # With the file in the cache, torchvision loads it from there and does not download.
    return _BUILDERS[name](weights=weights)


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent, attribute name, module) of ``net``'s first convolution (the one that sees the image)."""
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, child_name, child
    raise ValueError("model has no convolution")


def _adapt_input_channels(net: nn.Module, channels: int, pretrained: bool) -> None:
    """Give ``net``'s first convolution ``channels`` input channels (1: greyscale); see the docstring."""
    parent, attr, conv = _first_conv(net)
    if conv.in_channels == channels:
        return
    if channels != 1:
        raise ValueError(f"only 1 or 3 input channels are supported, not {channels}")
    new = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        weight = conv.weight.sum(dim=1, keepdim=True) if pretrained else conv.weight[:, :1]
        new.weight.copy_(weight)
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, attr, new)


def _split_torchvision(name: str, net: nn.Module) -> tuple[int, nn.Module, nn.Module | None]:
    """Remove ``net``'s last layer; (feature_dim, convolutional part, hidden FC layers or None)."""
    if name in _HAS_HIDDEN_FC:
        # Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear(4096, 1000)
        classifier = cast(nn.Sequential, net.classifier)
        last = cast(nn.Linear, classifier[6])
        classifier[6] = nn.Identity()
        return last.in_features, cast(nn.Module, net.features), classifier
    if name.startswith("resnet"):
        fc = cast(nn.Linear, net.fc)
        net.fc = nn.Identity()
        return fc.in_features, net, None
    # EfficientNet: its classifier is Dropout(0.2) + Linear; our head's ``dropout`` replaces both.
    linear = cast(nn.Linear, cast(nn.Sequential, net.classifier)[1])
    net.classifier = nn.Identity()
    return linear.in_features, net, None


def _saved_classifier(reference: str, model: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, resolved config) of an image_classifier ``model`` saved by ``hpo retrain``."""
    file = encoder_file(reference)
    saved = torch.load(file, map_location="cpu", weights_only=True)
    config = saved.get("config", {}) if isinstance(saved, dict) else {}
    if not isinstance(saved, dict) or config.get("model") != model or "model" not in saved:
        found = config.get("model") if isinstance(config, dict) else None
        raise HpoError(
            f"encoder_checkpoint {reference} ({file}) is not a saved {model} image_classifier"
            f"{f' (it is a {found})' if found else ''} "
            f"(fix: use the model that `hpo retrain` stored for a study with model: {model})"
        )
    return saved["model"], config


def _load_encoder(path: str, in_channels: int) -> tuple[nn.Module, int]:
    """A ResNet-18 image classifier saved by ``hpo retrain`` (report 000's encoder), its outputs."""
    state, config = _saved_classifier(path, "resnet18")
    outputs = int(state["head.1.weight"].shape[0])
    dropout = float(config.get("dropout", 0.0))
    saved_channels = int(state["backbone.conv1.weight"].shape[1])
    if saved_channels != in_channels:
        raise HpoError(
            f"encoder_checkpoint {path} takes {saved_channels}-channel images but the data has "
            f"{in_channels} (fix: set data.channels: {saved_channels}, as in the encoder's study)"
        )
    encoder = build_model(
        ModelOptions(name="resnet18", num_outputs=outputs, dropout=dropout, in_channels=in_channels)
    )
    encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("center_loss.")})
    return encoder, outputs


def _init_backbone(net: nn.Module, name: str, reference: str) -> None:
    """Load ``net``'s weights (last layer removed) from the backbone of a saved ``name`` classifier:
    report 002's scene classifier starts from its pretext model (rotation: 4 classes, perturbation:
    2), whose own head is dropped; the new head is initialised as usual."""
    state, _ = _saved_classifier(reference, name)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    try:
        net.load_state_dict(backbone)
    except RuntimeError as exc:  # e.g. saved for greyscale input, used with colour
        first = str(exc).splitlines()[0]
        raise HpoError(
            f"encoder_checkpoint {reference} does not fit this {name}: {first} "
            "(fix: use the same data.channels as the study that trained it)"
        ) from None


def build_model(options: ModelOptions) -> ImageClassifier:
    """Build the classifier described by ``options`` (CPU, float32)."""
    name = options.name
    transfer = options.transfer
    if transfer in ("classifier", "classifier_all") and name not in _HAS_HIDDEN_FC:
        raise HpoError(
            f"transfer: {transfer} freezes hidden fully connected layers, which {name} does not have "
            f"(fix: use it with {' or '.join(_HAS_HIDDEN_FC)}, or choose scratch, finetune or features)"
        )
    if name in MLP_MODELS:
        if transfer != "scratch" or options.pretrained:
            raise HpoError(
                f"model {name} has no pretrained weights (fix: transfer: scratch, pretrained: false)"
            )
        if options.in_features is None:
            raise ValueError("in_features is required for MLP models")
        trunk = ResidualMLP(options.in_features, options.mlp_width, options.mlp_layers)
        model = ImageClassifier(
            nn.Identity(), trunk, options.mlp_width, options.num_outputs, options.dropout, xavier_head=True
        )  # in_features already counts the channels
    elif name == "resnet18_mlp":
        # Report 000: a ResNet-18 encoder (its own fine-tuned one, or ImageNet's) with the MLP on top.
        if options.encoder_checkpoint:
            encoder, dim = _load_encoder(options.encoder_checkpoint, options.in_channels)
        else:
            encoder = _torchvision_model("resnet18", options.pretrained)
            _adapt_input_channels(encoder, options.in_channels, options.pretrained)
            dim, encoder, _ = _split_torchvision("resnet18", encoder)
        trunk = ResidualMLP(dim, options.mlp_width, options.mlp_layers)
        frozen = (encoder,) if transfer == "features" else ()
        model = ImageClassifier(
            encoder,
            trunk,
            options.mlp_width,
            options.num_outputs,
            options.dropout,
            frozen,
            xavier_head=True,
            frozen_mode=options.frozen_mode,
        )
    else:
        from_checkpoint = bool(options.encoder_checkpoint)
        net = _torchvision_model(name, options.pretrained and not from_checkpoint)
        _adapt_input_channels(net, options.in_channels, options.pretrained)
        dim, conv, hidden_fc = _split_torchvision(name, net)
        if options.encoder_checkpoint:
            _init_backbone(net, name, options.encoder_checkpoint)
        frozen_parts: tuple[nn.Module, ...] = ()
        if transfer == "features":
            frozen_parts = (conv,)
        elif transfer in ("classifier", "classifier_all") and hidden_fc is not None:
            frozen_parts = (hidden_fc,)
        model = ImageClassifier(
            net,
            None,
            dim,
            options.num_outputs,
            options.dropout,
            frozen_parts,
            frozen_mode=options.frozen_mode,
            freeze_head=transfer == "classifier_all",
        )
    if options.center_loss:
        model.center_loss = CenterLoss(options.num_outputs, model.feature_dim, options.center_alpha)
    return model
