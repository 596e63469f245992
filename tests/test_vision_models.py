"""Model construction: torchvision backbones with new heads, transfer modes, report 000's MLP,
and pretrained weights read from the local torch cache only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from hpo.errors import HpoError
from objectives.vision.models import ModelOptions, ResidualMLP, build_model, pretrained_weights_file


@pytest.mark.parametrize(
    ("name", "feature_dim"),
    [("alexnet", 4096), ("vgg16", 4096), ("resnet18", 512), ("resnet50", 2048), ("efficientnet_b0", 1280)],
)
def test_torchvision_models_get_a_new_head(name: str, feature_dim: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelOptions(name=name, num_outputs=7, dropout=0.2)).eval()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, features = model.forward_with_features(x)
    assert logits.shape == (2, 7)
    assert features.shape == (2, feature_dim)
    assert isinstance(model.head[0], nn.Dropout) and model.head[0].p == 0.2
    assert model.head[1].in_features == feature_dim and model.head[1].out_features == 7
    # The ImageNet 1000-way layer is gone: no parameter has 1000 rows any more.
    assert all(p.shape[0] != 1000 for p in model.parameters())


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_alexnet_transfer_modes_freeze_the_reported_parts() -> None:
    features = build_model(ModelOptions(name="alexnet", num_outputs=5, transfer="features"))
    trainable = _trainable_names(features)
    assert not any(n.startswith("backbone.features.") for n in trainable)
    assert {"backbone.classifier.1.weight", "backbone.classifier.4.weight", "head.1.weight"} <= trainable

    frozen_fc = build_model(ModelOptions(name="alexnet", num_outputs=5, transfer="classifier"))
    trainable = _trainable_names(frozen_fc)
    assert not any(n.startswith("backbone.classifier.") for n in trainable)
    assert {"backbone.features.0.weight", "head.1.weight"} <= trainable  # the new last layer trains

    everything = build_model(ModelOptions(name="alexnet", num_outputs=5, transfer="finetune"))
    assert _trainable_names(everything) == {n for n, _ in everything.named_parameters()}


# Trainable parameters per transfer mode with Caltech101's 101 classes. AlexNet: convolutions
# 2,469,696; hidden FC layers 9216*4096+4096 + 4096*4096+4096 = 54,534,144; new last layer
# 4096*101+101 = 413,797. ResNet-18: everything but fc 11,176,512; new fc 512*101+101 = 51,813.
@pytest.mark.parametrize(
    ("name", "transfer", "trainable"),
    [
        ("alexnet", "scratch", 57_417_637),
        ("alexnet", "finetune", 57_417_637),
        ("alexnet", "features", 54_534_144 + 413_797),
        ("alexnet", "classifier", 2_469_696 + 413_797),
        ("resnet18", "scratch", 11_228_325),
        ("resnet18", "finetune", 11_228_325),
        ("resnet18", "features", 51_813),
    ],
)
def test_trainable_parameter_counts_per_transfer_mode(name: str, transfer: str, trainable: int) -> None:
    model = build_model(ModelOptions(name=name, num_outputs=101, transfer=transfer))  # type: ignore[arg-type]
    assert sum(p.numel() for p in model.trainable_parameters()) == trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def _dropout_and_bn_modes(model: nn.Module, prefix: str) -> set[bool]:
    return {
        m.training
        for n, m in model.named_modules()
        if n.startswith(prefix) and isinstance(m, (nn.Dropout, nn.BatchNorm2d))
    }


def test_frozen_mode_train_is_the_reports_requires_grad_only() -> None:
    # Default frozen_mode: train. Frozen FC layers keep their dropout on (AlexNet, transfer classifier) ...
    alexnet = build_model(ModelOptions(name="alexnet", num_outputs=5, transfer="classifier")).train()
    assert _dropout_and_bn_modes(alexnet, "backbone.classifier") == {True}
    torch.manual_seed(0)
    hidden = alexnet.backbone.classifier  # type: ignore[union-attr]
    x = torch.randn(2, 9216)
    assert not torch.equal(hidden(x), hidden(x))  # two different dropout masks
    # ... and frozen ResNet batch-norm layers keep adapting their statistics (transfer features).
    resnet = build_model(ModelOptions(name="resnet18", num_outputs=3, transfer="features")).train()
    assert _trainable_names(resnet) == {"head.1.weight", "head.1.bias"}
    assert _dropout_and_bn_modes(resnet, "backbone") == {True}
    bn: Any = resnet.backbone.bn1  # type: ignore[union-attr]
    before = bn.running_mean.clone()
    resnet(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)
    assert all(p.grad is None for p in resnet.backbone.parameters())


def test_frozen_mode_eval_keeps_frozen_parts_in_eval_mode() -> None:
    alexnet = build_model(
        ModelOptions(name="alexnet", num_outputs=5, transfer="classifier", frozen_mode="eval")
    ).train()
    assert _dropout_and_bn_modes(alexnet, "backbone.classifier") == {False}
    assert alexnet.head.training  # the new last layer (and its dropout) trains
    hidden = alexnet.backbone.classifier  # type: ignore[union-attr]
    x = torch.randn(2, 9216)
    assert torch.equal(hidden(x), hidden(x))  # no dropout
    resnet = build_model(
        ModelOptions(name="resnet18", num_outputs=3, transfer="features", frozen_mode="eval")
    ).train()
    assert not resnet.backbone.training and resnet.head.training
    assert _dropout_and_bn_modes(resnet, "backbone") == {False}
    bn: Any = resnet.backbone.bn1  # type: ignore[union-attr]
    before = bn.running_mean.clone()
    resnet(torch.randn(4, 3, 32, 32))
    assert torch.equal(bn.running_mean, before)  # frozen batch-norm statistics do not move
    # Unfrozen models are unaffected by the option: everything trains in training mode.
    whole = build_model(ModelOptions(name="resnet18", num_outputs=3, transfer="finetune", frozen_mode="eval"))
    assert _dropout_and_bn_modes(whole.train(), "backbone") == {True}


@pytest.mark.parametrize(
    ("name", "first_conv"),
    [
        ("resnet18", "backbone.conv1"),
        ("alexnet", "backbone.features.0"),
        ("efficientnet_b0", "backbone.features.0.0"),
    ],
)
def test_greyscale_input_adapts_the_first_layer(name: str, first_conv: str) -> None:
    torch.manual_seed(0)
    grey = build_model(ModelOptions(name=name, num_outputs=7, in_channels=1))  # type: ignore[arg-type]
    conv = dict(grey.named_modules())[first_conv]
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 1
    with torch.no_grad():
        assert grey.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_greyscale_resnet18_has_the_reports_parameter_counts() -> None:
    # Report 003's summary: Conv2d-1 has 3,136 parameters, 11,272,840 in all (200 classes).
    model = build_model(ModelOptions(name="resnet18", num_outputs=200, in_channels=1))
    resnet: Any = model.backbone
    assert resnet.conv1.weight.shape == (64, 1, 7, 7) and resnet.conv1.weight.numel() == 3_136
    assert sum(p.numel() for p in model.parameters()) == 11_272_840


def test_greyscale_pretrained_kernel_is_the_sum_of_the_colour_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for ImageNet weights in a local torch cache: a seeded random ResNet-18's state.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    path = pretrained_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = build_model(
        ModelOptions(name="resnet18", num_outputs=4, transfer="finetune", pretrained=True, in_channels=1)
    )
    resnet: Any = model.backbone
    assert torch.allclose(resnet.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    # So a grey image gives the colour model's response to the same grey in all three channels.
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(resnet.conv1(x), reference.conv1(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_classifier_mode_needs_hidden_fc_layers() -> None:
    with pytest.raises(HpoError, match="resnet18 does not have"):
        build_model(ModelOptions(name="resnet18", num_outputs=3, transfer="classifier"))


def test_report_000_mlp_structure_and_initialisation() -> None:
    torch.manual_seed(0)
    model = build_model(ModelOptions(name="mlp", num_outputs=2, in_features=300, mlp_width=400))
    linears = [m for m in model.trunk.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 11  # 11 hidden layers
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.trunk.modules()) == 11
    slopes = {m.negative_slope for m in model.trunk.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}
    # Kaiming normal, a = 0.01: std = sqrt(2 / (1 + a^2) / fan_in); Xavier normal for the last layer.
    hidden = linears[1].weight.detach()
    assert float(hidden.std()) == pytest.approx(math.sqrt(2 / (1 + 0.01**2) / 400), rel=0.03)
    last = model.last_layer.weight.detach()
    assert float(last.std()) == pytest.approx(math.sqrt(2 / (400 + 2)), rel=0.1)


def test_mlp_blocks_have_skip_connections() -> None:
    mlp = ResidualMLP(in_features=6, width=8, layers=3).eval()
    blocks: Any = mlp.blocks
    for block in blocks:  # make every block output exactly zero
        nn.init.zeros_(block[0].weight)
        nn.init.zeros_(block[0].bias)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.inp(x))  # x + 0: the input passes through the skips


def test_missing_pretrained_weights_name_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert pretrained_weights_file("resnet18") == expected
    with pytest.raises(HpoError) as info:
        build_model(ModelOptions(name="resnet18", num_outputs=3, transfer="finetune", pretrained=True))
    message = str(info.value)
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "pretrained: false" in message
    assert not expected.exists()  # nothing was downloaded


def test_pretrained_weights_load_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(123)
    cached = torchvision.models.resnet18().state_dict()
    path = pretrained_weights_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(cached, path)
    model = build_model(ModelOptions(name="resnet18", num_outputs=4, transfer="finetune", pretrained=True))
    resnet: Any = model.backbone
    assert torch.equal(resnet.conv1.weight, cached["conv1.weight"])
    assert torch.equal(resnet.layer4[1].bn2.running_var, cached["layer4.1.bn2.running_var"])


def test_encoder_checkpoint_must_be_a_saved_resnet18(tmp_path: Path) -> None:
    with pytest.raises(HpoError, match="does not exist"):
        build_model(
            ModelOptions(name="resnet18_mlp", num_outputs=1, encoder_checkpoint=str(tmp_path / "x.pt"))
        )
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "config": {"model": "alexnet"}}, other)
    with pytest.raises(HpoError, match="not a saved resnet18"):
        build_model(ModelOptions(name="resnet18_mlp", num_outputs=1, encoder_checkpoint=str(other)))
