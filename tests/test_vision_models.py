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


def test_frozen_parts_stay_in_eval_mode() -> None:
    model = build_model(ModelOptions(name="resnet18", num_outputs=3, transfer="features"))
    assert _trainable_names(model) == {"head.1.weight", "head.1.bias"}
    model.train()
    assert not model.backbone.training and model.head.training
    resnet: Any = model.backbone
    bn = resnet.bn1
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(bn.running_mean, before)  # frozen batch-norm statistics do not move


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
