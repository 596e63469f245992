"""Fused trials (hpo._fused, objectives._digits_fused): K digits trials trained as one batched model
give each trial the metrics, value and checkpoint of its unfused run, within float tolerance.

Tolerance: every metric of every epoch within 1e-5 (absolute, on losses of order 0.1-2.3), the
weights and optimizer state in the checkpoints within 1e-4 (Adam's normalised step turns a
rounding difference in a near-zero gradient into a visible one; measured: ~1.1e-5 at worst). The
difference is rounding only: a batched matmul (``baddbmm``) adds in another order than K single
``addmm`` calls, and torch's fused optimizer kernels round differently from its default
single-tensor path (measured: metrics within ~6e-7 after five epochs).

Everything is real: the digits data, torch optimizers and schedulers, Optuna trials and pruners,
checkpoints on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.nn.functional as F

from hpo._fused import (
    Stack,
    StackedOptimizer,
    batched_linear,
    fusable_groups,
    member_cross_entropy,
    why_not_fusable,
    why_not_fusable_runs,
)
from hpo.objective import TrialRun
from hpo.spec import StudySpec, parse_study
from hpo.training import CHECKPOINT_FILE, build_optimizer, build_scheduler
from objectives._digits_fused import DIGITS_MAY_DIFFER, train_fused
from objectives.digits import DigitsConfig, train
from objectives.vision._fused_mlp import residual_mlp_forward
from objectives.vision.models import ImageClassifier, ModelOptions
from objectives.vision.models import build_model as build_vision_model

TOL = 1e-5  # metrics
WEIGHT_TOL = 1e-4  # weights and optimizer state: Adam's normalised steps magnify rounding
BASE = {"hidden_units": 32, "hidden_layers": 2, "batch_size": 32}
# K = 3 members differing in every fusable hyperparameter
MEMBERS: list[dict[str, Any]] = [
    {"lr": 0.05, "weight_decay": 0.0, "momentum": 0.9, "scheduler": "step", "step_size": 2, "gamma": 0.5},
    {"lr": 0.01, "weight_decay": 1e-3, "momentum": 0.0, "scheduler": "exponential", "gamma": 0.9},
    {"lr": 0.003, "weight_decay": 1e-2, "momentum": 0.5, "scheduler": "step", "step_size": 1, "gamma": 0.3},
]


class WorkerKilled(BaseException):
    """A killed worker: not an Exception, so it ends the whole group as it ends an unfused trial."""


def make_spec(settings: Mapping[str, Any], epochs: int, **extra: Any) -> StudySpec:
    raw = {
        "name": "fused",
        "objective": "digits_mlp",
        "data": {"subset": 0.3},
        "settings": dict(settings),
        "search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 3,
        "budget": {"max_epochs": epochs},
        "seed": 7,
        "sampler": "random",
        **extra,
    }
    return parse_study(raw, "test study")


def make_run(
    study: optuna.Study,
    spec: StudySpec,
    params: Mapping[str, Any],
    folder: Path,
    crash_after: int | None = None,
) -> TrialRun:
    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        if crash_after is not None and epoch == crash_after:
            raise WorkerKilled(f"killed after epoch {epoch}")

    return TrialRun(
        trial=study.ask(),
        spec=spec,
        params=dict(params),
        max_epochs=spec.budget.max_epochs,
        device="cpu",
        checkpoint_dir=folder,
        cache={},
        on_epoch=on_epoch,
    )


def unfused(spec: StudySpec, params: Mapping[str, Any], folder: Path, study: optuna.Study) -> TrialRun:
    run = make_run(study, spec, params, folder)
    with contextlib.suppress(optuna.TrialPruned):  # a pruned trial's history is still its own
        train(run)
    return run


def assert_close_histories(a: Mapping[str, list[float]], b: Mapping[str, list[float]]) -> None:
    assert set(a) == set(b) == {"train_loss", "val_loss", "val_acc"}
    for name in a:
        assert len(a[name]) == len(b[name]), name
        assert a[name] == pytest.approx(b[name], abs=TOL, rel=0), name


def checkpoint(folder: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return state


def assert_close_checkpoints(a: Path, b: Path) -> None:
    left, right = checkpoint(a), checkpoint(b)
    assert left["epoch"] == right["epoch"] and left["config"] == right["config"]
    assert left["scheduler"] == right["scheduler"]
    assert left["model"].keys() == right["model"].keys()
    for key, tensor in left["model"].items():
        torch.testing.assert_close(tensor, right["model"][key], atol=WEIGHT_TOL, rtol=0)
    lo, ro = left["optimizer"], right["optimizer"]
    assert lo["param_groups"] == ro["param_groups"]
    assert lo["state"].keys() == ro["state"].keys()
    for index, state in lo["state"].items():
        assert state.keys() == ro["state"][index].keys()
        for name, value in state.items():
            torch.testing.assert_close(value, ro["state"][index][name], atol=WEIGHT_TOL, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        {**BASE, "optimizer": "sgd", "nesterov": True, "dropout": 0.2},
        {**BASE, "optimizer": "adam"},
        {**BASE, "optimizer": "adamw", "dropout": 0.1},
    ],
    ids=["sgd-nesterov-dropout", "adam", "adamw-dropout"],
)
def test_fused_members_equal_their_unfused_runs(settings: dict[str, Any], tmp_path: Path) -> None:
    spec = make_spec(settings, epochs=4)
    study = optuna.create_study()
    members_params = MEMBERS
    if settings["optimizer"] != "sgd":
        # Adam's step is about lr * sign(gradient) where a gradient is near 0 (a dropped unit), so
        # at lr 0.05 a rounding difference of 1e-7 in such a gradient becomes a full step: 1e-3 in
        # train_loss after one epoch with torch 2.14.1, fused or not (docs/fused-trials.md).
        members_params = [{**p, "lr": min(p["lr"], 0.02)} for p in MEMBERS]
    alone = [unfused(spec, p, tmp_path / f"alone{i}", study) for i, p in enumerate(members_params)]
    runs = [make_run(study, spec, p, tmp_path / f"fused{i}") for i, p in enumerate(members_params)]
    members = train_fused(runs)
    for i, (member, single) in enumerate(zip(members, alone, strict=True)):
        assert member.error is None
        assert member.epochs_trained == 4
        assert_close_histories(member.run.history, single.history)
        assert member.value == pytest.approx(single.final_value(), abs=TOL, rel=0)
        frozen = study._storage.get_trial(member.run.trial._trial_id)
        expected = study._storage.get_trial(single.trial._trial_id).intermediate_values
        assert frozen.intermediate_values == pytest.approx(expected, abs=TOL, rel=0)
        assert_close_checkpoints(tmp_path / f"fused{i}", tmp_path / f"alone{i}")
    # the members really differ: fusing did not make them one run
    finals = [m.run.history["val_loss"][-1] for m in members]
    assert len({round(v, 4) for v in finals}) == 3


def test_a_pruned_member_leaves_the_group_and_the_others_are_unchanged(tmp_path: Path) -> None:
    """A member with a learning rate too small to learn stays above the threshold and is pruned at
    epoch 2 (ThresholdPruner: no pruning before step 2); an early-stopping rule stops another one early."""
    spec = make_spec(
        {**BASE, "optimizer": "adam", "scheduler": "none"},
        epochs=6,
        early_stopping={"rule": "patience", "patience": 1},
    )
    params = [{"lr": 0.003}, {"lr": 1e-5}, {"lr": 0.05}]

    def pruned_study() -> optuna.Study:
        return optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=2.2, n_warmup_steps=2))

    alone_study = pruned_study()
    alone = [unfused(spec, p, tmp_path / f"alone{i}", alone_study) for i, p in enumerate(params)]
    study = pruned_study()
    members = train_fused([make_run(study, spec, p, tmp_path / f"fused{i}") for i, p in enumerate(params)])

    assert isinstance(members[1].error, optuna.TrialPruned)
    assert members[1].epochs_trained == 2 and members[1].value is None
    states = [study._storage.get_trial(m.run.trial._trial_id) for m in members]
    assert len(states[1].intermediate_values) == 2
    # lr 0.05 is worse at epoch 2 than at epoch 1: patience 1 stops it there; lr 0.003 improves
    # every epoch and trains its whole budget, after both others left
    assert members[2].error is None and members[2].epochs_trained == 2
    assert members[0].error is None and members[0].epochs_trained == 6
    for member, single in zip(members, alone, strict=True):
        assert_close_histories(member.run.history, single.history)
    for i in (0, 2):
        assert members[i].value == pytest.approx(alone[i].final_value(), abs=TOL, rel=0)
        assert_close_checkpoints(tmp_path / f"fused{i}", tmp_path / f"alone{i}")


def test_a_fused_group_resumes_from_its_members_checkpoints(tmp_path: Path) -> None:
    """The group dies at epoch 3 (member 1's report kills the worker): every member has its
    epoch-2 checkpoint (epoch 3's are written after all members reported). Member 0's retry runs
    alone and dies at epoch 4, after checkpointing epoch 3. A new group resumes each member from
    its own checkpoint (member 0 joins one epoch later) and ends as the uninterrupted group; a
    member of the uninterrupted group's checkpoint also resumes alone, unfused."""
    spec = make_spec({**BASE, "optimizer": "sgd", "dropout": 0.2}, epochs=5)
    study = optuna.create_study()
    whole = train_fused([make_run(study, spec, p, tmp_path / f"whole{i}") for i, p in enumerate(MEMBERS)])

    crashing = [
        make_run(study, spec, p, tmp_path / f"trial{i}", crash_after=3 if i == 1 else None)
        for i, p in enumerate(MEMBERS)
    ]
    with pytest.raises(WorkerKilled):
        train_fused(crashing)
    assert [checkpoint(tmp_path / f"trial{i}")["epoch"] for i in range(3)] == [2, 2, 2]
    with pytest.raises(WorkerKilled):
        train(make_run(study, spec, MEMBERS[0], tmp_path / "trial0", crash_after=4))
    assert [checkpoint(tmp_path / f"trial{i}")["epoch"] for i in range(3)] == [3, 2, 2]

    retry = train_fused([make_run(study, spec, p, tmp_path / f"trial{i}") for i, p in enumerate(MEMBERS)])
    for i, (member, done) in enumerate(zip(retry, whole, strict=True)):
        resumed = study._storage.get_trial(member.run.trial._trial_id).user_attrs["resumed_from_epoch"]
        assert resumed == (3 if i == 0 else 2)
        assert member.epochs_trained == 5 - resumed
        assert_close_histories(member.run.history, done.run.history)
        assert member.value == pytest.approx(done.value, abs=TOL, rel=0)
        assert_close_checkpoints(tmp_path / f"trial{i}", tmp_path / f"whole{i}")

    # a fused member's checkpoint is an ordinary one: the unfused trial resumes it alone
    longer = make_spec({**BASE, "optimizer": "sgd", "dropout": 0.2}, epochs=6)
    alone = unfused(longer, MEMBERS[0], tmp_path / "whole0", study)
    reference = unfused(longer, MEMBERS[0], tmp_path / "reference", study)
    assert study._storage.get_trial(alone.trial._trial_id).user_attrs["resumed_from_epoch"] == 5
    assert_close_histories(alone.history, reference.history)


def test_stacked_optimizer_steps_as_torch_does() -> None:
    """Three members' stacked SGD / Adam / AdamW updates, with schedules, match torch's own steps."""
    for name in ("sgd", "adam", "adamw"):
        torch.manual_seed(0)
        shapes = {"w": (5, 4), "b": (5,)}
        own = [{n: torch.randn(s, requires_grad=True) for n, s in shapes.items()} for _ in MEMBERS]
        copies = [{n: t.detach().clone().requires_grad_(True) for n, t in p.items()} for p in own]
        opts, schedules, refs = [], [], []
        for params, cfg, copy in zip(own, MEMBERS, copies, strict=True):
            opt = build_optimizer(
                name, list(params.values()), cfg["lr"], cfg["weight_decay"], cfg["momentum"], True
            )
            ref = build_optimizer(
                name, list(copy.values()), cfg["lr"], cfg["weight_decay"], cfg["momentum"], True
            )
            kind, step, gamma = str(cfg["scheduler"]), int(cfg.get("step_size", 1)), float(cfg["gamma"])
            opts.append(opt)
            refs.append((ref, build_scheduler(kind, ref, step_size=step, gamma=gamma)))
            schedules.append(build_scheduler(kind, opt, step_size=step, gamma=gamma))
        stacked = {n: torch.stack([p[n].detach() for p in own]).requires_grad_(True) for n in shapes}
        fused = StackedOptimizer(opts, list(shapes))
        fused.import_from(stacked)
        for _ in range(4):
            grads = {n: torch.randn((len(MEMBERS), *s)) for n, s in shapes.items()}
            for n in shapes:
                stacked[n].grad = grads[n].clone()
            fused.step()
            for k, (ref, schedule) in enumerate(refs):
                for n, tensor in copies[k].items():
                    tensor.grad = grads[n][k].clone()
                ref.step()
                assert schedule is not None
                schedule.step()
            fused.export_to()
            for sched in schedules:
                assert sched is not None
                sched.step()
        for k, (ref, _) in enumerate(refs):
            for n in shapes:
                torch.testing.assert_close(stacked[n][k].detach(), copies[k][n].detach(), atol=1e-6, rtol=0)
            state, expected = opts[k].state_dict()["state"], ref.state_dict()["state"]
            assert state.keys() == expected.keys(), name
            for index in expected:
                for key, value in expected[index].items():
                    torch.testing.assert_close(state[index][key], value, atol=1e-6, rtol=0)


def test_stacked_optimizer_over_the_members_own_parameters_steps_as_torch_does() -> None:
    """``use_own`` (members trained in turn): each member's own parameters and its optimizer's own
    state are stepped in place, from its own gradients, as torch's optimizer steps them: the state
    appears in torch's format after the first step (none for SGD without momentum), and a
    member's existing state (a resumed checkpoint) is the one updated."""
    for name in ("sgd", "adam", "adamw"):
        torch.manual_seed(0)
        own = [[torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True)] for _ in MEMBERS]
        copies = [[t.detach().clone().requires_grad_(True) for t in params] for params in own]
        opts, refs = [], []
        for params, copy, cfg in zip(own, copies, MEMBERS, strict=True):
            args = (cfg["lr"], cfg["weight_decay"], cfg["momentum"], True)
            opts.append(build_optimizer(name, params, *args))
            refs.append(build_optimizer(name, copy, *args))
        # the last member resumes: two steps' state already in its optimizer, as a checkpoint loads it
        for _ in range(2):
            for params, ref in ((own[-1], opts[-1]), (copies[-1], refs[-1])):
                for tensor in params:
                    tensor.grad = torch.ones_like(tensor)
                ref.step()
        held = {
            id(t): t
            for state in opts[-1].state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        }
        fused = StackedOptimizer(opts, ["w", "b"])
        fused.use_own(own)
        for step in range(3):
            grads = [[torch.randn_like(t) for t in params] for params in own]
            if step == 1:  # one member at a time, as a member run in turn steps (Stack.step_member)
                for k in reversed(range(len(own))):
                    fused.step_own(k, grads[k])
            else:
                fused.step(grads)
            for copy, ref, member_grads in zip(copies, refs, grads, strict=True):
                for tensor, grad in zip(copy, member_grads, strict=True):
                    tensor.grad = grad.clone()
                ref.step()
            for k, ref in enumerate(refs):
                state, expected = opts[k].state_dict()["state"], ref.state_dict()["state"]
                assert state.keys() == expected.keys(), (name, k, step)
                for index in expected:
                    assert state[index].keys() == expected[index].keys(), (name, k)
                    for key, value in expected[index].items():
                        torch.testing.assert_close(state[index][key], value, atol=1e-6, rtol=0)
                for tensor, reference in zip(own[k], copies[k], strict=True):
                    torch.testing.assert_close(tensor.detach(), reference.detach(), atol=1e-6, rtol=0)
        if name == "sgd":  # the member without momentum keeps no state, as torch's SGD
            assert MEMBERS[1]["momentum"] == 0 and not opts[1].state
        resumed = [
            t for state in opts[-1].state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ]
        assert resumed and all(id(t) in held for t in resumed)  # updated in place, not replaced
        fused.export_to()  # nothing to copy back: the members' state is already their own
        with pytest.raises(ValueError, match="gradients"):
            fused.step()


def test_exported_optimizer_state_is_the_members_own_and_stays_as_exported() -> None:
    """Each export writes the stacks' state into the members' optimizers as copies (into the
    tensors they already hold, from the second export on): a later stacked step never changes
    what was exported, and each export holds the state of its own step."""
    for name in ("sgd", "adamw"):
        torch.manual_seed(0)
        weights = [torch.randn(3, 2, requires_grad=True) for _ in range(2)]
        opts = [build_optimizer(name, [w], 0.1, 0.01, 0.9) for w in weights]
        stacked = {"w": torch.stack([w.detach() for w in weights]).requires_grad_(True)}
        fused = StackedOptimizer(opts, ["w"])
        fused.import_from(stacked)
        exported: list[dict[str, torch.Tensor]] = []
        for _ in range(3):
            stacked["w"].grad = torch.randn(2, 3, 2)
            fused.step()
            fused.export_to()
            state = opts[1].state[weights[1]]
            expected = {
                key: (fused.state["w"][key][1] if key != "step" else fused.steps[1, 0]).clone()
                for key in state
            }
            for key, value in state.items():
                torch.testing.assert_close(value, expected[key], atol=0, rtol=0)
            exported.append({key: value.clone() for key, value in state.items()})
            snapshot = {key: value for key, value in state.items()}
            stacked["w"].grad = torch.randn(2, 3, 2)
            fused.step()  # not exported: the members' state must not move with the stacks
            for key, value in snapshot.items():
                torch.testing.assert_close(value, exported[-1][key], atol=0, rtol=0)
        assert not torch.equal(exported[0][next(iter(exported[0]))], exported[-1][next(iter(exported[-1]))])


def test_batched_linear_is_each_members_linear_with_its_gradients() -> None:
    """The fused layers' batched Linear (its own backward pass, in the weights' layout) against K
    ``F.linear`` calls: outputs and every gradient, for member-major and member-minor inputs, and
    with the input's gradient not needed (a shared first layer)."""
    torch.manual_seed(0)
    k, batch, width_in, width_out = 3, 5, 4, 6
    weight = torch.randn(k, width_out, width_in, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, width_out, dtype=torch.float64, requires_grad=True)
    member_major = torch.randn(k, batch, width_in, dtype=torch.float64, requires_grad=True)
    member_minor = torch.randn(batch, k, width_in, dtype=torch.float64, requires_grad=True)
    for h in (member_major, member_minor.transpose(0, 1)):
        assert torch.autograd.gradcheck(batched_linear, (h, weight, bias))
        upstream = torch.randn(k, batch, width_out, dtype=torch.float64)
        fused = torch.autograd.grad((batched_linear(h, weight, bias) * upstream).sum(), (h, weight, bias))
        one_by_one = torch.stack([F.linear(h[m], weight[m], bias[m]) for m in range(k)])
        expected = torch.autograd.grad((one_by_one * upstream).sum(), (h, weight, bias))
        for got, want in zip(fused, expected, strict=True):
            torch.testing.assert_close(got, want)
    frozen = member_major.detach()
    out = batched_linear(frozen, weight, bias)
    weight_grad, bias_grad = torch.autograd.grad(out.sum(), (weight, bias))
    torch.testing.assert_close(weight_grad, frozen.sum(1, keepdim=True).expand(k, width_out, width_in))
    torch.testing.assert_close(bias_grad, torch.full((k, width_out), float(batch), dtype=torch.float64))


def test_configurations_that_cannot_fuse_are_rejected(tmp_path: Path) -> None:
    adam = {**BASE, "optimizer": "adam", "lr": 0.01}
    assert (
        why_not_fusable([adam, {**adam, "lr": 0.1, "weight_decay": 0.1, "gamma": 0.3}], DIGITS_MAY_DIFFER)
        is None
    )
    for key, value in [("batch_size", 64), ("hidden_units", 16), ("dropout", 0.2), ("optimizer", "sgd")]:
        reason = why_not_fusable([adam, {**adam, key: value}], DIGITS_MAY_DIFFER)
        assert reason is not None and key in reason
    # a key present in only one configuration is a difference too
    assert "nesterov" in str(why_not_fusable([adam, {**adam, "nesterov": True}], DIGITS_MAY_DIFFER))

    queue: Sequence[dict[str, Any]] = [
        adam,
        {**adam, "batch_size": 64},
        {**adam, "lr": 0.1},
        {**adam, "lr": 0.2},
        {**adam, "batch_size": 64, "lr": 0.3},
    ]
    assert fusable_groups(queue, DIGITS_MAY_DIFFER, max_size=8) == [[0, 2, 3], [1, 4]]
    assert fusable_groups(queue, DIGITS_MAY_DIFFER, max_size=2) == [[0, 2], [1, 4], [3]]
    with pytest.raises(ValueError):
        fusable_groups(queue, DIGITS_MAY_DIFFER, max_size=0)

    # trials: the seed and the data must match as well, and the fused trainer refuses otherwise
    study = optuna.create_study()
    spec = make_spec(BASE, epochs=1)
    other_seed = make_spec(BASE, epochs=1, seed=8)
    runs = [
        make_run(study, spec, {"lr": 0.01}, tmp_path / "a"),
        make_run(study, other_seed, {}, tmp_path / "b"),
    ]
    assert why_not_fusable_runs(runs, DIGITS_MAY_DIFFER) == "the trials have different seeds"
    with pytest.raises(ValueError, match="different seeds"):
        train_fused(runs)
    # an option left out equals its default given explicitly (the validated configurations compare)
    explicit = make_spec({**BASE, "dropout": 0.0, "nesterov": False}, epochs=1)
    runs = [make_run(study, spec, {}, tmp_path / "a"), make_run(study, explicit, {"lr": 0.1}, tmp_path / "b")]
    assert why_not_fusable_runs(runs, DIGITS_MAY_DIFFER) is not None  # raw: dropout is unset in one
    assert (
        why_not_fusable_runs(runs, DIGITS_MAY_DIFFER, lambda run: DigitsConfig(**run.config).model_dump())
        is None
    )
    wider = make_spec({**BASE, "hidden_units": 16}, epochs=1)
    runs = [make_run(study, spec, {}, tmp_path / "a"), make_run(study, wider, {}, tmp_path / "b")]
    with pytest.raises(ValueError, match="hidden_units"):
        train_fused(runs)


def test_report_000_mlp_fused_steps_equal_unfused_steps() -> None:
    """Report 000's residual MLP (batch norm, skip connections, head dropout): three members with
    their own SGD hyperparameters, trained on the same batches fused and unfused, end with the same
    weights, batch-norm running statistics and training/evaluation outputs (the model part of
    fused vision trials; the vision training loop is not fused yet)."""
    torch.manual_seed(3)
    x = torch.rand(40, 3, 4, 4)
    y = torch.randint(0, 5, (40,))
    options = ModelOptions(
        name="mlp", num_outputs=5, mlp_width=16, mlp_layers=3, in_features=48, dropout=0.2, pretrained=False
    )

    def members() -> tuple[list[ImageClassifier], list[torch.optim.Optimizer]]:
        models, optimizers = [], []
        for cfg in MEMBERS:
            torch.manual_seed(11)  # every trial of a study starts from the study seed's weights
            model = build_vision_model(options)
            models.append(model)
            params = [{"params": model.trainable_parameters()}]
            optimizers.append(build_optimizer("sgd", params, cfg["lr"], cfg["weight_decay"], cfg["momentum"]))
        return models, optimizers

    batches = [slice(0, 16), slice(16, 32), slice(32, 40)]
    alone, alone_opts = members()
    losses = []
    for model, opt in zip(alone, alone_opts, strict=True):
        torch.manual_seed(5)  # the epoch's dropout masks
        model.train()
        for batch in batches:
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))

    models, opts = members()
    stack = Stack(list(models), list(opts))
    torch.manual_seed(5)
    for batch in batches:
        logits = residual_mlp_forward(models[0], stack.params, stack.buffers, x[batch], True)
        fused_losses = member_cross_entropy(logits, y[batch])
        fused_losses.sum().backward()
        stack.step()
    assert [float(v) for v in fused_losses.detach()] == pytest.approx(losses, abs=TOL, rel=0)
    with torch.no_grad():
        fused_eval = residual_mlp_forward(models[0], stack.params, stack.buffers, x, False)
    stack.write_back()
    for k, (model, single) in enumerate(zip(models, alone, strict=True)):
        for (name, tensor), expected in zip(
            model.state_dict().items(), single.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(tensor, expected, atol=WEIGHT_TOL, rtol=0, msg=name)
        single.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused_eval[k], single(x), atol=TOL, rtol=0)
    # the members really differ: their SGD hyperparameters took them apart
    assert float((models[0].last_layer.weight - models[1].last_layer.weight).detach().abs().max()) > 1e-3


def test_attribute_mlp_fused_trials_equal_their_unfused_runs(tmp_path: Path) -> None:
    # Report 000's MLP through its fused trainer (objectives.vision._fused_mlp.train_fused) against
    # objectives.vision.train.train: metrics, value and checkpoints, on synthetic CelebA attributes.
    # SGD: with Adam the Linear biases before each batch norm (whose gradient is rounding noise
    # around 0) take normalised, noise-signed steps in the unfused run too, so they and the running
    # means differ by ~1e-2 between any two ways of rounding; the training losses still agree.
    from synthetic_data import make_celeba

    from objectives.vision._fused_mlp import train_fused as train_vision_fused
    from objectives.vision.train import train as train_vision

    root = make_celeba(tmp_path / "celeba", n=60, size=8)
    raw = {
        "name": "fused_r000",
        "objective": "image_classifier",
        "data": {"format": "celeba", "root": str(root), "image_size": 8},
        "settings": {
            "model": "attribute_mlp",
            "target_attribute": "Smiling",
            "mlp_width": 32,
            "mlp_layers": 3,
            "batch_size": 16,
            "dropout": 0.2,
            "optimizer": "sgd",
            "scheduler": "step",
            "step_size": 1,
        },
        "search_space": {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}},
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 3,
        "budget": {"max_epochs": 3},
        "seed": 5,
        "sampler": "random",
    }
    spec = parse_study(raw, "test study")
    study = optuna.create_study()
    members = [{"lr": 0.05, "gamma": 0.5}, {"lr": 0.1, "weight_decay": 0.01, "momentum": 0.5, "gamma": 0.9}]
    alone = []
    for i, params in enumerate(members):
        run = make_run(study, spec, params, tmp_path / f"u{i}")
        train_vision(run)
        alone.append(run)
    fused = train_vision_fused([make_run(study, spec, p, tmp_path / f"f{i}") for i, p in enumerate(members)])
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.value == pytest.approx(run.final_value(), abs=TOL)
        history = member.run.history
        assert set(history) == set(run.history) >= {"train_loss", "train_acc", "val_loss", "val_map", "lr"}
        for name, values in run.history.items():
            assert history[name] == pytest.approx(values, abs=TOL, rel=0), name
        assert_close_checkpoints(tmp_path / f"f{i}", tmp_path / f"u{i}")


def test_attribute_mlp_members_checkpoint_on_their_own_schedule_and_resume_together(tmp_path: Path) -> None:
    """Each member honours its own checkpoint_every: killed at epoch 3, a member checkpointing every
    3 epochs has none, one checkpointing every epoch has epoch 2 (epoch 3's are written after every
    member reported). The retried group starts the first from scratch, resumes the second at epoch 3,
    and both end as their unfused runs; a member leaving has its last checkpoint on disk already,
    also when the group writes in a background thread (every member set checkpoint_async)."""
    from synthetic_data import make_celeba

    from hpo._fused import writes_in_background
    from objectives.vision._fused_mlp import train_fused as train_vision_fused
    from objectives.vision.train import train as train_vision

    root = make_celeba(tmp_path / "celeba", n=60, size=8)
    settings = {
        "model": "attribute_mlp",
        "target_attribute": "Smiling",
        "mlp_width": 16,
        "mlp_layers": 2,
        "batch_size": 16,
        "optimizer": "sgd",
        "scheduler": "step",
        "step_size": 1,
        "checkpoint_async": True,
    }
    raw = {
        "name": "fused_every",
        "objective": "image_classifier",
        "data": {"format": "celeba", "root": str(root), "image_size": 8},
        "settings": settings,
        "search_space": {
            "lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
            "checkpoint_every": {"type": "int", "low": 1, "high": 4},
        },
        "metric": "val_loss",
        "direction": "minimize",
        "n_trials": 2,
        "budget": {"max_epochs": 4},
        "seed": 3,
        "sampler": "random",
    }
    spec = parse_study(raw, "test study")
    study = optuna.create_study()
    members = [{"lr": 0.05, "checkpoint_every": 3}, {"lr": 0.1, "gamma": 0.5, "checkpoint_every": 1}]
    alone = []
    for i, params in enumerate(members):
        run = make_run(study, spec, params, tmp_path / f"u{i}")
        train_vision(run)
        alone.append(run)

    crashing = [
        make_run(study, spec, p, tmp_path / f"f{i}", crash_after=3 if i == 1 else None)
        for i, p in enumerate(members)
    ]
    with pytest.raises(WorkerKilled):
        train_vision_fused(crashing)
    assert not (tmp_path / "f0" / CHECKPOINT_FILE).exists()
    assert checkpoint(tmp_path / "f1")["epoch"] == 2

    on_disk_at_leave: dict[int, int] = {}

    def on_leave(member: Any) -> None:
        on_disk_at_leave[member.run.number] = checkpoint(member.run.checkpoint_dir)["epoch"]

    runs = [make_run(study, spec, p, tmp_path / f"f{i}") for i, p in enumerate(members)]
    fused = train_vision_fused(runs, on_leave)
    assert writes_in_background(fused)
    assert not writes_in_background([fused[0], dataclasses.replace(fused[1], checkpoint_async=False)])
    assert [m.epochs_trained for m in fused] == [4, 2]
    assert on_disk_at_leave == {runs[0].number: 4, runs[1].number: 4}
    for i, (member, run) in enumerate(zip(fused, alone, strict=True)):
        assert member.error is None and member.value == pytest.approx(run.final_value(), abs=TOL)
        for name, values in run.history.items():
            assert member.run.history[name] == pytest.approx(values, abs=TOL, rel=0), name
        assert_close_checkpoints(tmp_path / f"f{i}", tmp_path / f"u{i}")
