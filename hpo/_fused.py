"""Fused trials: K trials that differ only in optimizer and schedule hyperparameters, trained as one.

Why: one small model does not fill a machine. A trial of the digits MLP spends its time in per-op
overhead (a 64x64 matmul is microseconds of work and tens of microseconds of dispatch), so K
trials that share the model, the data, the batch size and the seed can run their forward and
backward passes as one batched model (``bmm`` over stacked weights) and their optimizer steps as
one fused kernel call per member, on the same batches. Measured on 2 loaded CPU cores
(``benchmarks/fused_trials.py``, K=8): the digits MLP trains 2.4-3x faster in CPU time; with an
SQLite storage the per-epoch commits of each trial, which fusion does not remove, bring that to
~1.3-2x. Fusion pays where per-op overhead dominates: report 000's MLP (0.73M parameters, batch
16) is memory-bound on a CPU, and K stacked copies stop fitting in cache (1.1-1.6x); on a GPU,
where small models are launch-bound, the case is the opposite.

Results equal the unfused runs (float tolerance, not bits: a batched matmul rounds differently
from K single ones) because nothing a trial would see changes:

* every member keeps its own ``nn.Module``, built by the objective exactly as the unfused trial
  builds it (same seed, so the same initial weights), its own ordinary torch optimizer and
  scheduler (so per-member hyperparameters, schedules and the optimizer state, in torch's own
  format, are the unfused ones) and its own :class:`hpo.objective.TrialRun`;
* for one epoch the members' weights and optimizer state are copied into stacked ``(K, ...)``
  tensors (:class:`Stack`); the loss is the sum of the members' losses, so each member's gradient
  is its own; :class:`StackedOptimizer` steps each member with torch's fused optimizer kernel on
  its slice of the stacks, with the hyperparameters of the member's own param group (where its
  scheduler put them); after the epoch everything is copied back, the member schedulers step,
  and each member reports, checkpoints (the unfused trial's checkpoint format:
  ``hpo.training.save_checkpoint``) and may leave;
* all trials of a study share the study seed, so each epoch's data order and dropout masks are
  the same for every member: the data order comes from ``seed_epoch(seed, epoch)``, and a dropout
  mask depends only on the RNG state and the activation's shape, so one mask per layer and batch,
  drawn as the unfused trial draws it, is every member's mask.

Per member, :func:`train_group` keeps the unfused loop's order (train, schedule, evaluate,
report, checkpoint): a member whose report raises (``optuna.TrialPruned``, a NaN metric) or that
early-stops or reaches its own ``max_epochs`` leaves the group; the others continue unchanged. A
member resumed from its checkpoint joins the group at its next epoch (members at different epochs
cannot share batches, so the group starts at the earliest and members join as it reaches them).
A ``BaseException`` (a killed worker) ends the whole group, as it ends an unfused trial.

Claiming K trials (``hpo worker --fuse K``: :mod:`hpo._fused_worker`)
----------------------------------------------------------------------
* The worker claims trials one at a time exactly as today (``study.ask()`` or a queued trial);
  each claimed trial is an ordinary Optuna trial with its own lease and heartbeat, renewed by the
  worker for every member while the group trains, and told its own state (COMPLETE, PRUNED,
  FAIL) when its member leaves, not when the group ends.
* After the first claim the worker keeps claiming while the group has fewer than K members and
  the next trial passes :func:`why_not_fusable_runs` against the first: the objective declares
  its ``may_differ`` keys (digits: ``objectives._digits_fused.DIGITS_MAY_DIFFER``) and a fused
  trainer (digits: ``train_fused``), e.g. as two new optional fields of ``Objective``; every
  other option (architecture, optimizer kind, batch size, ...) must match, and the data and seed
  do within one study. A trial that cannot fuse is not put back: it starts the next group (or
  runs alone), so claiming never reorders or starves the queue. Grid and random studies can
  claim K at once; TPE claims K with the constant liar so the K asks differ.
* The group runs in one trainer process; each member's ``TrialRun`` reports through the same
  pipe as an unfused trial's, tagged with its trial. A crash of that process fails (and so
  retries) every member, each resuming from its own checkpoint, alone or in a new group.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import optuna
import torch
from torch import nn

from hpo.objective import TrialRun
from hpo.training import CheckpointWriter, checkpoint_due

# ---------------------------------------------------------------------------------------------
# Which trials can fuse


def fusion_key(config: Mapping[str, Any], may_differ: frozenset[str] | set[str]) -> str:
    """What must be equal for two trials to fuse: the configuration without ``may_differ``."""
    return json.dumps({k: v for k, v in config.items() if k not in may_differ}, sort_keys=True, default=str)


def why_not_fusable(
    configs: Sequence[Mapping[str, Any]], may_differ: frozenset[str] | set[str]
) -> str | None:
    """None when every configuration can train in one group, else the first reason why not.

    ``may_differ``: the keys that may take different values (the objective's optimizer and
    schedule hyperparameters); every other key, present or absent, must be equal.
    """
    if not configs:
        return "no configurations"
    first = configs[0]
    for index, other in enumerate(configs[1:], start=1):
        for key in sorted(set(first) | set(other)):
            if key in may_differ:
                continue
            if key not in first or key not in other or first[key] != other[key]:
                left = first.get(key, "<unset>")
                right = other.get(key, "<unset>")
                return f"configuration {index} has {key}={right!r} where configuration 0 has {left!r}"
    return None


def fusable_groups(
    configs: Sequence[Mapping[str, Any]], may_differ: frozenset[str] | set[str], max_size: int
) -> list[list[int]]:
    """Indices of ``configs`` in groups of at most ``max_size`` that can fuse, in queue order:
    each configuration joins the first open group it fits, so no trial waits behind a later one."""
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, not {max_size}")
    groups: list[list[int]] = []
    keys: list[str] = []
    for index, config in enumerate(configs):
        key = fusion_key(config, may_differ)
        for group, group_key in zip(groups, keys, strict=True):
            if group_key == key and len(group) < max_size:
                group.append(index)
                break
        else:
            groups.append([index])
            keys.append(key)
    return groups


def why_not_fusable_runs(
    runs: Sequence[TrialRun],
    may_differ: frozenset[str] | set[str],
    config_of: Callable[[TrialRun], Mapping[str, Any]] = lambda run: run.config,
) -> str | None:
    """:func:`why_not_fusable` for trials: their seeds and data must be equal too (every epoch's
    batches and dropout masks come from the seed and the data). ``config_of``: the configuration
    to compare, e.g. validated with its defaults filled in, so that an option left out equals
    its default given explicitly."""
    if len({run.seed for run in runs}) > 1:
        return "the trials have different seeds"
    if len({json.dumps(run.data, sort_keys=True, default=str) for run in runs}) > 1:
        return "the trials have different data settings"
    if len({run.device for run in runs}) > 1:
        return "the trials are on different devices"
    return why_not_fusable([config_of(run) for run in runs], may_differ)


# ---------------------------------------------------------------------------------------------
# Stacked optimizer: each member's update by torch's fused kernels, on its slice of the stacks


class StackedOptimizer:
    """Steps K members' stacked parameters, each member as its own torch optimizer would.

    Supports what :func:`hpo.training.build_optimizer` builds: ``SGD`` (momentum, Nesterov,
    weight decay), ``Adam`` and ``AdamW`` (no amsgrad, no maximize), one param group per member.
    Each member's update is one call of torch's fused kernel (``torch._fused_sgd_`` /
    ``_fused_adam_`` / ``_fused_adamw_``, what ``fused=True`` optimizers run) on the member's
    slices of the stacked parameters, gradients and state, with the hyperparameters of the
    member's own ``param_groups[0]`` read at every step (where its scheduler puts them). Why a
    kernel per member rather than one update over the stacks: on the CPU it is one vectorised
    pass per tensor where the stacked arithmetic is ten, so it is faster despite K calls, and
    per-member values of every hyperparameter (Nesterov, betas, eps too) come for free. The
    kernels round differently from torch's default single-tensor path, within float tolerance.

    The state lives in stacks while the group trains; :meth:`import_from` and :meth:`export_to`
    move it from and to the members' optimizers in torch's ``state`` format, so the members'
    checkpoints are the unfused ones. Or, after :meth:`use_own`, each member's own parameters and
    its optimizer's own state tensors are stepped in place (members trained in turn).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], names: Sequence[str]) -> None:
        self.optimizers = list(optimizers)
        self.names = list(names)
        kinds = {type(opt) for opt in self.optimizers}
        if len(kinds) != 1:
            raise ValueError(f"members use different optimizers: {sorted(k.__name__ for k in kinds)}")
        self.kind = kinds.pop()
        if self.kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            raise ValueError(f"{self.kind.__name__} cannot be fused; use sgd, adam or adamw")
        for opt in self.optimizers:
            if len(opt.param_groups) != 1 or len(opt.param_groups[0]["params"]) != len(self.names):
                raise ValueError("a fused member's optimizer must hold all its parameters in one group")
            group = opt.param_groups[0]
            if group.get("maximize") or group.get("amsgrad") or group.get("differentiable"):
                raise ValueError("maximize, amsgrad and differentiable optimizers cannot be fused")
        self.params: dict[str, torch.Tensor] = {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = torch.zeros(len(self.optimizers), len(self.names))  # Adam: step counts (K, P)
        self.fresh: list[bool] = []  # SGD: members without momentum buffers yet (first step)
        # Each member's slices, made once per import rather than at every step.
        self._params: list[list[torch.Tensor]] = []
        self._state: list[dict[str, list[torch.Tensor]]] = []
        self._steps: list[list[torch.Tensor]] = []
        self.own = False  # use_own: the members' own parameters and optimizer state, no stacks
        self._new_state: list[dict[int, dict[str, torch.Tensor]]] = []  # use_own: made, not yet stored

    def _groups(self) -> list[dict[str, Any]]:
        return [opt.param_groups[0] for opt in self.optimizers]

    def import_from(self, params: Mapping[str, torch.Tensor]) -> None:
        """Stack the members' optimizer state (zeros where a member has none yet) for the stacked
        parameters ``params`` (K, ...), which :meth:`step` then updates in place."""
        self.params = dict(params)
        member_states = [
            [opt.state.get(param, {}) for param in opt.param_groups[0]["params"]] for opt in self.optimizers
        ]
        if self.kind is torch.optim.SGD:
            self.fresh = [any(s.get("momentum_buffer") is None for s in states) for states in member_states]
            keys = ["momentum_buffer"]
        else:
            self.steps = torch.tensor(
                [[float(s["step"]) if s else 0.0 for s in states] for states in member_states],
                dtype=torch.float32,  # torch's own step counters: float32 scalars
            )
            keys = ["exp_avg", "exp_avg_sq"]
        for index, name in enumerate(self.names):
            zeros = torch.zeros_like(params[name][0])
            self.state[name] = {
                key: torch.stack(
                    [
                        states[index][key] if states[index].get(key) is not None else zeros
                        for states in member_states
                    ]
                )
                for key in keys
            }
        members = range(len(self.optimizers))
        self._params = [[params[n][k] for n in self.names] for k in members]
        self._state = [{key: [self.state[n][key][k] for n in self.names] for key in keys} for k in members]
        self._steps = [list(self.steps[k].unbind()) for k in members]

    def use_own(self, params: Sequence[Sequence[torch.Tensor]]) -> None:
        """Step each member's own parameters (``params[k]``, in the order of ``names``) with the
        state in its own optimizer (torch's format, where :meth:`import_from` stacks it): nothing
        to stack, export or copy back. A member's missing state (its first step) is made here and
        put in its optimizer's ``state`` by its first :meth:`step`, where torch's optimizer puts
        it."""
        self.own = True
        self.params = {}
        self._params = [list(member) for member in params]
        self._new_state = [{} for _ in self.optimizers]
        self._state, self._steps, self.fresh = [], [], []
        for k, opt in enumerate(self.optimizers):
            if self.kind is not torch.optim.SGD:
                keys = ["exp_avg", "exp_avg_sq"]
            else:  # torch's SGD keeps no state without momentum (AlexNet: 0.2 GB a member)
                keys = ["momentum_buffer"] if float(opt.param_groups[0]["momentum"]) != 0 else []
            member: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
            steps: list[torch.Tensor] = []
            fresh = False
            for param in self._params[k]:
                state = opt.state.get(param, {})
                new: dict[str, torch.Tensor] = {}  # in torch's order: step, exp_avg, exp_avg_sq
                if self.kind is not torch.optim.SGD:
                    step = state.get("step")
                    if not isinstance(step, torch.Tensor) or step.dtype != torch.float32:
                        step = new["step"] = torch.tensor(float(step or 0.0), dtype=torch.float32)
                    steps.append(step)
                for key in keys:
                    value = state.get(key)
                    if value is None:
                        value = new[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
                        fresh = True
                    member[key].append(value)
                if new:
                    self._new_state[k][id(param)] = new
            self._state.append(member)
            self._steps.append(steps)
            self.fresh.append(fresh)

    def export_to(self) -> None:
        """Write the stacked state back into each member's optimizer, in torch's format.

        Into the member's own state tensors where it has them (every epoch after its first): a
        copy, where new tensors would be an allocation, page faults included, of the whole
        optimizer state of every member at every epoch (AlexNet's classifier: 0.2 GB a member)."""
        if self.own:
            return  # stepped in place (use_own)
        for k, opt in enumerate(self.optimizers):
            for index, name in enumerate(self.names):
                param = opt.param_groups[0]["params"][index]
                state = self.state[name]
                if self.kind is torch.optim.SGD:
                    if opt.param_groups[0]["momentum"] != 0 and not self.fresh[k]:
                        _store(opt.state[param], {"momentum_buffer": state["momentum_buffer"][k]})
                elif float(self.steps[k, index]) > 0:
                    own = {
                        "step": self.steps[k, index],  # torch's own float32 scalar
                        "exp_avg": state["exp_avg"][k],
                        "exp_avg_sq": state["exp_avg_sq"][k],
                    }
                    _store(opt.state[param], own)

    @torch.no_grad()
    def step(self, member_grads: Sequence[Sequence[torch.Tensor | None]] | None = None) -> None:
        """One step of every member, from the gradients of the stacked parameters, or from
        ``member_grads``: each member's gradients, in the order of ``names``, which
        :meth:`use_own` needs (the members' own modules, run in turn: :class:`Stack`)."""
        if member_grads is None:
            if self.own:
                raise ValueError("a stacked optimizer over the members' own parameters needs their gradients")
            stacked = []
            for name in self.names:
                grad = self.params[name].grad
                if grad is None:
                    raise RuntimeError(f"{name} has no gradient: every member parameter must be trained")
                stacked.append(grad.unbind(0))
            member_grads = [[grad[k] for grad in stacked] for k in range(len(self.optimizers))]
        if len(member_grads) != len(self.optimizers):
            raise ValueError(f"{len(member_grads)} members' gradients for {len(self.optimizers)} members")
        if (
            self.kind is not torch.optim.SGD and not self.own
        ):  # as torch's fused Adam counts before its kernel
            self.steps.add_(1)
        for k, grads in enumerate(member_grads):
            self._step_member(k, grads)

    @torch.no_grad()
    def step_own(self, k: int, grads: Sequence[torch.Tensor | None]) -> None:
        """One step of member ``k`` alone, from its own gradients (in the order of ``names``), on
        its own parameters (:meth:`use_own`): a member run in turn steps as soon as its backward
        pass is done, and its gradients can be freed before the next member's forward pass."""
        if not self.own:
            raise ValueError("only members stepped on their own parameters (use_own) step one at a time")
        self._step_member(k, grads)

    def _step_member(self, k: int, member_grads: Sequence[torch.Tensor | None]) -> None:
        group = self._groups()[k]
        member_params = self._params[k]
        grads = _all_given(member_grads, self.names)
        if self.kind is not torch.optim.SGD and self.own:  # as torch's fused Adam counts before its kernel
            torch._foreach_add_(self._steps[k], 1.0)
        if self.kind is torch.optim.SGD:
            momentum = float(group["momentum"])
            buffers = [] if momentum == 0 else self._state[k]["momentum_buffer"]
            torch._fused_sgd_(
                member_params,
                grads,
                buffers,
                weight_decay=float(group["weight_decay"]),
                momentum=momentum,
                lr=float(group["lr"]),
                dampening=float(group["dampening"]),
                nesterov=bool(group["nesterov"]),
                maximize=False,
                is_first_step=momentum != 0 and self.fresh[k],  # the buffer starts as the gradient
            )
            if momentum != 0:
                self.fresh[k] = False
            self._store_new(k)
            return
        decoupled = self.kind is torch.optim.AdamW or bool(group.get("decoupled_weight_decay"))
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        beta1, beta2 = group["betas"]
        kernel(
            member_params,
            grads,
            self._state[k]["exp_avg"],
            self._state[k]["exp_avg_sq"],
            [],
            self._steps[k],
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]),
            amsgrad=False,
            maximize=False,
        )
        self._store_new(k)

    def _store_new(self, k: int) -> None:
        """After member ``k``'s first step over its own parameters, its optimizer holds the state
        that step made (as torch's optimizer would have after it)."""
        if not self.own or not self._new_state[k]:
            return
        opt = self.optimizers[k]
        for param in self._params[k]:
            new = self._new_state[k].get(id(param))
            if new is not None:
                opt.state[param].update(new)
        self._new_state[k] = {}


def _all_given(grads: Sequence[torch.Tensor | None], names: Sequence[str]) -> list[torch.Tensor]:
    if len(grads) != len(names):
        raise ValueError(f"{len(grads)} gradients for {len(names)} parameters")
    for name, grad in zip(names, grads, strict=True):
        if grad is None:
            raise RuntimeError(f"{name} has no gradient: every member parameter must be trained")
    return cast(list[torch.Tensor], list(grads))


def _store(state: dict[str, Any], values: Mapping[str, torch.Tensor]) -> None:
    """Set one parameter's optimizer ``state`` to exactly ``values`` (copies, never views of the
    stacks), copying into the tensors it holds where they match."""
    fits = state.keys() == values.keys() and all(
        isinstance(state[key], torch.Tensor)
        and state[key].shape == value.shape
        and state[key].dtype == value.dtype
        and state[key].device == value.device
        for key, value in values.items()
    )
    if fits:
        for key, value in values.items():
            state[key].copy_(value)
    else:
        state.clear()
        state.update({key: value.clone() for key, value in values.items()})


# ---------------------------------------------------------------------------------------------
# Members and the group loop


@dataclass
class Member:
    """One trial in a fused group: its run, model, optimizer, scheduler and checkpoint identity.

    ``model`` is what the member's checkpoint holds; ``net``, when set, is the part of it the group
    stacks and trains (sharing its parameters), e.g. the trainable rest of a model whose frozen
    prefix runs once for the whole group. The optimizer holds exactly ``net``'s parameters.
    """

    run: TrialRun
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    identity: dict[str, Any]
    next_epoch: int = 1
    done: bool = False
    value: float | None = None
    error: Exception | None = None  # optuna.TrialPruned, a NaN metric, ...: this member's own end
    epochs_trained: int = 0
    checkpoint_when_pruned: bool = False  # as the unfused loop does (image_classifier: yes)
    checkpoint_every: int = 1  # hpo.training.checkpoint_due: every N epochs and the last
    checkpoint_async: bool = False  # the trial asked for background writes whatever their size
    net: nn.Module | None = None  # what the group trains (default: model)

    @property
    def trained(self) -> nn.Module:
        """The module the group stacks: ``net``, or the whole ``model``."""
        return self.net if self.net is not None else self.model

    def finish(self) -> None:
        self.done = True
        try:
            self.value = self.run.final_value()
        except Exception as exc:  # e.g. no epoch reported: the unfused trial raises it too
            self.error = exc


@dataclass
class Stack:
    """The active members' parameters and buffers as (K, ...) tensors, and their optimizer step.

    Built from the members' models and optimizers at the start of an epoch, written back at its
    end: between epochs the members' own modules and optimizers hold everything, so members can
    leave and join freely.

    ``in_turn``: for a forward pass that runs each member's own module one after another
    (:func:`objectives.vision._fused_cnn.in_turn_forward`), nothing is stacked (``params`` and
    ``buffers`` stay empty): :meth:`step` updates each member's own parameters and optimizer
    state in place (:meth:`StackedOptimizer.use_own`), and :meth:`write_back` has nothing to do.
    Only the trainable parameters (``requires_grad``) are stepped, so a member may hold frozen
    layers between trainable ones. Why not autograd through slices of stacked parameters there:
    every member's backward pass would build a (K, ...) gradient, a copy of all K members'
    gradients per step (AlexNet on a CPU: 2.7x slower than K unfused steps); and stacking copies
    every parameter and optimizer state in and out at every epoch.
    """

    models: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    in_turn: bool = False
    optimizer: StackedOptimizer = field(init=False)

    def __post_init__(self) -> None:
        # In turn, a member's frozen parameters (requires_grad=False: AlexNet/VGG's hidden FC
        # layers under transfer: classifier) run in its own forward pass and are not stepped;
        # stacked, every parameter is a stacked leaf, so every one must be trained.
        # Their buffers are stacked only when not in turn: in turn a member may hold buffers the
        # others lack (report 003's center-loss centres beside cross-entropy members).
        params = [_parameters(model, trainable_only=self.in_turn) for model in self.models]
        buffers = [dict(model.named_buffers()) for model in self.models]
        names = list(params[0])
        if any(list(p) != names for p in params) or (
            not self.in_turn and any(list(b) != list(buffers[0]) for b in buffers)
        ):
            raise ValueError("fused members must have the same architecture")
        for model_params, opt in zip(params, self.optimizers, strict=True):
            # the stacked optimizer pairs the i-th stacked parameter with the optimizer's i-th one
            held = [id(p) for group in opt.param_groups for p in group["params"]]
            if held != [id(p) for p in model_params.values()]:
                raise ValueError("a fused member's optimizer must hold its model's parameters, in order")
        self.optimizer = StackedOptimizer(self.optimizers, names)
        if self.in_turn:  # nothing stacked: each member trains its own module
            self.optimizer.use_own([list(p.values()) for p in params])
            return
        with torch.no_grad():
            for name in names:
                self.params[name] = torch.stack([p[name].detach() for p in params]).requires_grad_(True)
            for name in buffers[0]:
                self.buffers[name] = torch.stack([b[name] for b in buffers])
        self.optimizer.import_from(self.params)

    @property
    def size(self) -> int:
        return len(self.models)

    @property
    def reference(self) -> nn.Module:
        """One member's model: the architecture a batched forward pass walks."""
        return self.models[0]

    def step_member(self, k: int) -> None:
        """``in_turn``: step member ``k`` alone from its own module's gradients, and free them
        (what its unfused step does before the next batch's backward pass)."""
        if not self.in_turn:
            raise ValueError("stacked members step together (step)")
        params = list(_parameters(self.models[k], trainable_only=True).values())
        self.optimizer.step_own(k, [p.grad for p in params])
        for param in params:
            param.grad = None

    def step(self) -> None:
        """Step every member from its gradients: on the stacked parameters, or (``in_turn``) on
        its own module's."""
        if self.in_turn:
            own = [list(_parameters(model, trainable_only=True).values()) for model in self.models]
            self.optimizer.step([[p.grad for p in params] for params in own])
            for params in own:
                for param in params:
                    param.grad = None
            return
        self.optimizer.step()
        for stacked in self.params.values():
            stacked.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        if self.in_turn:
            return  # the members' own modules and optimizers were trained
        for k, model in enumerate(self.models):
            for name, param in model.named_parameters():
                param.copy_(self.params[name][k])
            for name, buffer in model.named_buffers():
                buffer.copy_(self.buffers[name][k])
        self.optimizer.export_to()


def _parameters(model: nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's parameters by name, in order; with ``trainable_only`` those with requires_grad."""
    return {
        name: param for name, param in model.named_parameters() if param.requires_grad or not trainable_only
    }


TrainEpoch = Callable[[Stack, int], list[float]]
Evaluate = Callable[[Stack], list[dict[str, float]]]


OnLeave = Callable[[Member], None]


def train_group(
    members: Sequence[Member],
    train_epoch: TrainEpoch,
    evaluate: Evaluate,
    on_leave: OnLeave | None = None,
    *,
    in_turn: bool = False,
) -> None:
    """Train the members together, each reporting, checkpointing and leaving as it would alone.

    ``train_epoch(stack, epoch)`` trains one epoch of the stacked members (seeding the epoch as
    the unfused loop does) and returns each member's training loss; ``evaluate(stack)`` returns
    each member's validation metrics. Each member ends with ``value`` or ``error`` set, and
    ``on_leave(member)`` is called the moment it does (the worker tells that trial's result
    then, not when the group ends). ``in_turn``: the trainer's forward pass runs each member's own
    module (:class:`Stack` ``in_turn``), so nothing is stacked.

    Each member checkpoints on its own schedule (``checkpoint_every``, and at its last epoch),
    in a background thread while the next epoch trains if :func:`writes_in_background`; a
    leaving member's checkpoint is on disk before ``on_leave`` is called.
    """
    leave = on_leave if on_leave is not None else (lambda member: None)
    for member in members:
        if member.next_epoch > member.run.max_epochs:  # its checkpoint already holds every epoch
            member.finish()
            leave(member)
    epoch = min((m.next_epoch for m in members if not m.done), default=0)
    # Leaving the block waits for the write in flight, however the group ends.
    with CheckpointWriter(writes_in_background(members)) as writer:
        stack: Stack | None = None
        while any(not m.done for m in members):
            active = [m for m in members if not m.done and m.next_epoch == epoch]
            if active:
                stack = _train_epoch(active, epoch, train_epoch, evaluate, leave, writer, stack, in_turn)
            epoch += 1


def writes_in_background(members: Sequence[Member]) -> bool:
    """Whether the group's checkpoints are written by a background thread: when every member
    asked for it (``checkpoint_async``). Not by default: the thread first copies each member's
    state, and for the small models fusion is for, measured on a CPU (digits MLP, K=8), the
    overlap gained nothing (0.99x): the writes are short and share the interpreter with training."""
    return bool(members) and all(m.checkpoint_async for m in members)


def _train_epoch(
    active: list[Member],
    epoch: int,
    train_epoch: TrainEpoch,
    evaluate: Evaluate,
    leave: OnLeave,
    writer: CheckpointWriter,
    previous: Stack | None,
    in_turn: bool,
) -> Stack:
    """One epoch of the active members; returns their stack, which the next epoch reuses when the
    same members train it (after ``write_back`` the stack and the members hold the same values, so
    stacking again would only copy every parameter and optimizer state: seconds per epoch for
    AlexNet's classifier)."""
    modules = [m.trained for m in active]
    same = previous is not None and len(previous.models) == len(modules)
    if previous is not None and same and all(a is b for a, b in zip(previous.models, modules, strict=True)):
        stack = previous
    else:
        stack = Stack(modules, [m.optimizer for m in active], in_turn=in_turn)
    train_losses = train_epoch(stack, epoch)
    stack.write_back()
    with warnings.catch_warnings():
        # Each optimizer did step, through the stack; torch's scheduler cannot see that and would
        # warn that it steps before its optimizer.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for member in active:
            if member.scheduler is not None:
                member.scheduler.step()
    val = evaluate(stack)
    saving: list[Member] = []
    leaving: list[Member] = []
    for k, member in enumerate(active):
        member.epochs_trained += 1
        metrics = {"train_loss": train_losses[k], **val[k]}
        try:
            stop = member.run.report(epoch, metrics)
        except Exception as exc:  # pruned or a bad metric: this member leaves, the others go on
            if member.checkpoint_when_pruned and isinstance(exc, optuna.TrialPruned):
                saving.append(member)
            member.done, member.error = True, exc
            leaving.append(member)
            continue
        member.next_epoch = epoch + 1
        ends = stop or epoch >= member.run.max_epochs
        if ends or checkpoint_due(epoch, member.run.max_epochs, member.checkpoint_every):
            saving.append(member)
        if ends:
            member.finish()
            leaving.append(member)
    writer.save_all([(m.run.checkpoint_dir, _checkpoint_state(m, epoch)) for m in saving])
    if leaving:
        writer.wait()  # a leaving member's result is told only once its checkpoint is on disk
        for member in leaving:
            leave(member)
    return stack


def _checkpoint_state(member: Member, epoch: int) -> dict[str, Any]:
    return {
        "model": member.model,
        "optimizer": member.optimizer,
        "scheduler": member.scheduler,
        "epoch": epoch,
        "config": member.identity,
        "history": member.run.history,
    }


# ---------------------------------------------------------------------------------------------
# Batched forward passes


class _BatchedLinear(torch.autograd.Function):
    """K members' Linear layers as one batched GEMM, with the backward pass in the weights' layout.

    Why not ``torch.baddbmm(bias, h, weight.transpose(1, 2))`` under autograd: its backward
    computes the weight gradient as ``h^T g`` in the transposed (K, in, out) layout and
    accumulates it into the (K, out, in) weights by a strided copy, which on a CPU can cost more
    than the matmuls. Here the weight gradient is ``g^T h``, written in the weights' own layout:
    with it (and member-minor activations) a fused epoch of report 000's MLP (K=8, width 256,
    batch 16) went from 5.5 s to 4.3 s on 2 cores; the 8 unfused trials took 6.6 s."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        needs_h, needs_weight, needs_bias = ctx.needs_input_grad
        grad_h = torch.bmm(grad, weight) if needs_h else None
        grad_weight = torch.bmm(grad.transpose(1, 2), h) if needs_weight else None
        grad_bias = grad.sum(1) if needs_bias else None
        return grad_h, grad_weight, grad_bias


def batched_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Each member's ``F.linear``: inputs (K, B, in) (any strides), weights (K, out, in), biases
    (K, out) -> (K, B, out)."""
    return cast(torch.Tensor, _BatchedLinear.apply(h, weight, bias))  # apply is untyped


def dropout_noise(shape: torch.Size | tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """The mask ``F.dropout`` draws on the CPU for an input of ``shape``, scaled by 1 / (1 - p):
    the same draws from the same RNG state, so one mask is every member's unfused mask.

    Only on the CPU: CUDA's dropout is a fused kernel that draws differently (the next step,
    with the torchvision models on a GPU, has to match it)."""
    if like.device.type != "cpu":
        raise NotImplementedError("fused dropout matches the unfused masks on the CPU only")
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p).div_(1 - p)


def sequential_forward(
    model: nn.Sequential, params: Mapping[str, torch.Tensor], x: torch.Tensor, training: bool
) -> torch.Tensor:
    """The K members' outputs (K, B, out) for one shared input batch ``x`` (B, in).

    ``model`` is one member (the architecture); ``params`` the stacked parameters by name. Layers:
    Linear, ReLU, LeakyReLU, Dropout (what the digits MLP is made of); anything else is refused.
    """
    return layers_forward(list(model.named_children()), params, x, training)


LAYERS_FORWARD = (nn.Linear, nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Identity)


def shared_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Every member's Linear on one shared input ``x`` (B, in): (B, K, out), for weights (K, out, in).

    One matmul against the members' weights side by side: a wider (so faster) GEMM than K small
    ones, and no copy of the input per member."""
    k, out = weight.shape[0], weight.shape[1]
    return torch.nn.functional.linear(x, weight.reshape(k * out, -1), bias.reshape(k * out)).view(
        x.shape[0], k, out
    )


def layers_forward(
    layers: Sequence[tuple[str, nn.Module]],
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """:func:`sequential_forward` over ``layers`` (qualified name, module) applied in order: the
    K members' outputs (K, B, out) for a shared input ``x`` (B, in) or per-member inputs (K, B, in).
    Layers: ``LAYERS_FORWARD``; the weights are ``params[f"{name}.weight"]`` (K, out, in)."""
    h = x
    for name, layer in layers:
        if isinstance(layer, nn.Identity):
            continue
        if isinstance(layer, nn.Linear):
            weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
            if h.dim() == 2:
                h = shared_linear(h, weight, bias).transpose(0, 1)  # (B, K, out) -> (K, B, out)
            else:
                h = batched_linear(h, weight, bias)
        elif isinstance(layer, nn.ReLU):
            h = torch.relu(h)
        elif isinstance(layer, nn.LeakyReLU):
            h = torch.nn.functional.leaky_relu(h, layer.negative_slope)
        elif isinstance(layer, nn.Dropout):
            if training and layer.p > 0:
                # the unfused member's dropout input is one (B, H) batch: draw that mask once
                h = h * dropout_noise(h.shape[-2:], layer.p, h)
        else:
            raise TypeError(f"{type(layer).__name__} layers cannot be fused yet")
    return h


def member_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy (K,) over its logits (K, B, C) for the shared targets (B,)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    index = target.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return -log_probs.gather(-1, index).squeeze(-1).mean(dim=1)
