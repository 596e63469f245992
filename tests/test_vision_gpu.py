"""The image classifier's GPU loop (CUDA only; every test skips with "no CUDA device" elsewhere).

* no host sync inside an epoch: after a warm-up epoch (cuDNN autotuning, the first copy of the
  normalisation constants, compilation), a training epoch and a validation pass run under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call (``.item()``,
  a blocking copy, ``nonzero``, ...). The epoch's one intended read-back, ``EpochMeter.compute``,
  is exempt and runs after it. Checked with data on the device and data kept on the host (the
  pinned, prefetched side-stream copy), single- and multi-label;
* fused optimizers: ``build_optimizer`` picks ``fused=True`` for CUDA parameters, and a fused step
  matches the classic one;
* ``compile: true`` trains like eager mode, including with ``reduce-overhead`` (CUDA graphs) and a
  partial last batch.

Run on a GPU machine: ``.venv/bin/pytest -q tests/test_vision_gpu.py`` (see docs/gpu.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from synthetic_data import make_imagefolder

from hpo.objective import TrialRun
from hpo.spec import parse_study
from hpo.training import CHECKPOINT_FILE, CheckpointWriter, build_optimizer
from objectives.vision.augment import Augmentation
from objectives.vision.losses import Criterion
from objectives.vision.models import ModelOptions, build_model
from objectives.vision.train import (
    Device,
    Inputs,
    compiled_forward,
    evaluate_sums,
    train,
    train_epoch_sums,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def synthetic_inputs(where: str, multilabel: bool, n: int = 70, size: int = 32, classes: int = 6) -> Inputs:
    """Random uint8 images and targets on ``where`` (70 = 4 full batches of 16 and a partial one)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    if multilabel:
        targets = (torch.rand(n, classes, generator=g) > 0.5).float()
    else:
        targets = torch.randint(0, classes, (n,), generator=g)
    half = n // 2
    return Inputs(
        images[:half].to(where),
        targets[:half].to(where),
        images[half:].to(where),
        targets[half:].to(where),
        images=True,
        multilabel=multilabel,
        num_outputs=classes,
    )


def one_epoch(
    model: Any, optimizer: torch.optim.Optimizer, inputs: Inputs, on: Device, forward: Any, seed: int
) -> tuple[Any, Any]:
    criterion = Criterion("bce" if inputs.multilabel else "cross_entropy")
    trained = train_epoch_sums(
        model,
        optimizer,
        criterion,
        inputs,
        batch_size=16,
        augmentation=Augmentation.preset("flip_jitter_rotation"),
        seed=seed,
        on=on,
        forward=forward,
    )
    validated = evaluate_sums(model, criterion, inputs, batch_size=16, on=on, forward=forward)
    return trained, validated


@pytest.mark.parametrize(
    ("data_on", "multilabel", "compiled"),
    [
        ("cuda", False, False),
        ("cuda", True, False),
        ("cpu", False, False),  # pinned host memory, side-stream prefetch
        ("cpu", True, False),
        ("cuda", False, True),  # compiled once: compilation is the slow part of this file
    ],
    ids=["device-single-label", "device-multi-label", "host-single-label", "host-multi-label", "compiled"],
)
def test_an_epoch_makes_no_host_sync(data_on: str, multilabel: bool, compiled: bool) -> None:
    on = Device.for_run("cuda")
    torch.backends.cudnn.benchmark = True
    inputs = synthetic_inputs(data_on, multilabel)
    torch.manual_seed(0)
    model = build_model(ModelOptions(name="resnet18", num_outputs=inputs.num_outputs)).to("cuda")
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer("adamw", model.trainable_parameters(), 1e-3, weight_decay=1e-4)
    forward = compiled_forward(model) if compiled else None
    for seed in (1, 2):  # warm-up: autotuning, constants, compilation, optimizer state
        for meter in one_epoch(model, optimizer, inputs, on, forward, seed):
            meter.compute()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trained, validated = one_epoch(model, optimizer, inputs, on, forward, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    metrics = trained.compute() | validated.compute()  # the one read-back (exempt in any case)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert ("val_map" in metrics) == multilabel


def test_the_sync_check_catches_an_item_call() -> None:
    """The check above is not vacuous: a per-batch ``.item()`` raises under the same mode."""
    x = torch.ones(4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_cuda_parameters_get_fused_optimizers_that_step_like_the_classic_ones(name: str) -> None:
    torch.manual_seed(0)
    fused_model = torch.nn.Linear(32, 8).cuda()
    classic_model = torch.nn.Linear(32, 8).cuda()
    classic_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(name, fused_model.parameters(), 1e-2, weight_decay=1e-3, momentum=0.9)
    classic = build_optimizer(name, classic_model.parameters(), 1e-2, 1e-3, 0.9, fused=False)
    assert fused.param_groups[0]["fused"] is True
    assert not classic.param_groups[0].get("fused")
    x = torch.randn(64, 32, device="cuda")
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (classic_model, classic)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), classic_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cpu = build_optimizer(name, torch.nn.Linear(2, 2).parameters(), 1e-2)
    assert not cpu.param_groups[0].get("fused")


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("colours"), classes=5, per_class=14, size=32)


def run_on_cuda(colours: Path, directory: Path, settings: dict[str, Any], epochs: int = 2) -> TrialRun:
    raw = {
        "name": "gpu",
        "objective": "image_classifier",
        "data": {"format": "imagefolder", "root": str(colours), "image_size": 32, "val_fraction": 0.3},
        "settings": settings,
        "search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 1,
        "budget": {"max_epochs": epochs},
        "seed": 5,
        "sampler": "random",
    }
    run = TrialRun(
        trial=optuna.create_study().ask(),
        spec=parse_study(raw, "gpu study"),
        params={"lr": 1e-3},
        max_epochs=epochs,
        device="cuda",
        checkpoint_dir=directory,
        cache={},
    )
    train(run)
    return run


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_matches_eager(colours: Path, tmp_path: Path, mode: str) -> None:
    """49 training images in batches of 16: three full batches and a partial one, all trained on."""
    settings = {"model": "resnet18", "batch_size": 16, "eval_batch_size": 16, "optimizer": "adamw"}
    settings |= {"precision": "fp32"}  # compare without bf16 rounding
    eager = run_on_cuda(colours, tmp_path / "eager", settings)
    compiled = run_on_cuda(
        colours, tmp_path / "compiled", {**settings, "compile": True, "compile_mode": mode}
    )
    for name in ("train_loss", "val_loss"):
        assert compiled.history[name] == pytest.approx(eager.history[name], rel=2e-3), name


def test_an_asynchronous_checkpoint_of_cuda_tensors_is_the_state_when_it_was_asked_for(
    tmp_path: Path,
) -> None:
    model = torch.nn.Linear(256, 256).cuda()
    optimizer = build_optimizer("adamw", model.parameters(), 1e-3)
    model(torch.ones(4, 256, device="cuda")).sum().backward()
    optimizer.step()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with CheckpointWriter(asynchronous=True) as writer:
        writer.save(
            tmp_path, model=model, optimizer=optimizer, scheduler=None, epoch=1, config={}, history={}
        )
        with torch.no_grad():
            model.weight.fill_(-1.0)  # training goes on while the checkpoint is written
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["model"].keys() == expected.keys()
    assert all(torch.equal(state["model"][k], v) for k, v in expected.items())
