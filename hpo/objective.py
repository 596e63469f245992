"""The contract between hpo and training code.

An objective is an :class:`Objective`: a ``train(run) -> float`` function plus, optionally, a
pydantic model of the options it understands (``config``) and of its dataset settings (``data``).
Every option can be fixed in the study file's ``settings:`` or searched in its search space; the
objective sees both merged in ``run.config``. A training loop looks like::

    def train(run: TrialRun) -> float:
        model, optimizer, scheduler = build(run.config, run.device)
        for epoch in range(1, run.max_epochs + 1):
            train_one_epoch(model, optimizer, ...)
            metrics = evaluate(model, ...)            # {"val_loss": ..., "val_acc": ...}
            if run.report(epoch, metrics):            # records, prunes (raises), early-stops
                break
        return run.final_value()

``run.report`` stores every epoch's metrics with the trial, reports the study metric to the
pruner (raising ``optuna.TrialPruned`` when the pruner says so) and returns True when the study's
early-stopping rule says training should stop.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from pydantic import BaseModel, ValidationError

from hpo._objective_path import import_objective_module
from hpo._records import write_trial_metrics
from hpo.errors import SpecError
from hpo.policy import ObjectivePolicy, known_objectives, lookup_target

# System attribute a sampler may set on a trial (in ``before_trial``) to give that trial its own
# epoch budget; multi-fidelity samplers such as BOHB use it. Absent: the study's max_epochs.
BUDGET_ATTR = "hpo:budget"
# Each epoch's metric values (trial system attr "hpo:metrics", see hpo._records) are written with
# the trial at most this often, and always when the trial ends: real epochs take longer, so every
# epoch shows up live, while trivial objectives do not pay an extra write per epoch. The study
# metric itself is reported (the trial's intermediate values) every epoch regardless.
METRICS_FLUSH_SECONDS = 2.0
# A metric every objective has without reporting it: the wall-clock seconds the trial has trained
# up to the end of each epoch (for a resumed trial, its earlier attempts' seconds included). It is
# recorded only in studies that name it in ``metric:`` (e.g. ``metric: [val_loss, train_seconds]``),
# so other studies' curves stay exactly reproducible: timing never is.
TRAIN_SECONDS = "train_seconds"
BUILTIN_METRICS = (TRAIN_SECONDS,)

if TYPE_CHECKING:
    from hpo.spec import EarlyStoppingSpec, StudySpec


@dataclass(frozen=True)
class Objective:
    """Training code plus the options it accepts.

    ``config`` validates ``settings`` merged with a configuration of the search space; ``data``
    validates the study file's ``data:`` section. ``metrics`` names every metric the objective can
    report to ``run.report`` (the union over its options); the study's ``metric:`` must be one of
    them. All three are checked when the study file is loaded, before any training starts; an
    empty ``metrics`` (the default) declares nothing and leaves ``metric:`` unchecked, and the
    runtime KeyError in :meth:`TrialRun.report` stays the backstop either way.

    Fused trials (``hpo worker --fuse K``, :mod:`hpo._fused`), optional: ``fused_train(runs,
    on_leave)`` trains several trials as one batched model and calls ``on_leave(member)`` (an
    :class:`hpo._fused.Member`, with ``value`` or ``error`` set) as each trial leaves the group;
    ``may_differ`` names the options fused trials may differ in (every other option must be
    equal); ``why_not_fusable(config, device)`` says why a trial (its validated configuration,
    defaults filled in) cannot fuse at all, or None. Without ``fused_train`` every trial runs alone.
    """

    train: Callable[[TrialRun], float]
    config: type[BaseModel] | None = None
    data: type[BaseModel] | None = None
    description: str = ""
    metrics: tuple[str, ...] = ()
    fused_train: Callable[[Sequence[TrialRun], Callable[[Any], None]], Sequence[Any]] | None = None
    may_differ: frozenset[str] = frozenset()
    why_not_fusable: Callable[[Mapping[str, Any], str], str | None] | None = None


class EarlyStopping:
    """Pure early-stopping rules over the sequence of a trial's metric values."""

    def __init__(self, spec: EarlyStoppingSpec, direction: str) -> None:
        self.spec = spec
        self.sign = 1.0 if direction == "minimize" else -1.0  # sign * value: lower is better
        self.values: list[float] = []
        self._result: float | None = None

    def _better(self, a: float, b: float, delta: float = 0.0) -> bool:
        return self.sign * a < self.sign * b - delta

    def update(self, value: float) -> bool:
        """Record one epoch's value; True when training should stop now."""
        self.values.append(value)
        if self.spec.rule == "consecutive_worse" and len(self.values) >= 3:
            before, first, second = self.values[-3:]
            if self._better(before, first) and self._better(before, second):
                self._result = first if self._better(second, first) else second
                return True
        if self.spec.rule == "patience":
            best_index = self._best_index()
            if len(self.values) - 1 - best_index >= self.spec.patience:
                self._result = self.values[best_index]
                return True
        return False

    def _best_index(self) -> int:
        best = 0
        for i, value in enumerate(self.values):
            if self._better(value, self.values[best], self.spec.min_delta):
                best = i
        return best

    @property
    def stopped(self) -> bool:
        return self._result is not None

    def result(self) -> float:
        """The trial's value: ``spec.score``'s epoch when set (best or last, whatever the rule);
        else the rule's value when it stopped training, else as the rule scores."""
        if not self.values:
            raise RuntimeError("no epoch was reported")
        if self.spec.score == "last_epoch":
            return self.values[-1]
        if self.spec.score == "best_epoch":
            return min(self.values, key=lambda v: self.sign * v)
        if self._result is not None:
            return self._result
        if self.spec.rule == "patience":
            return self.values[self._best_index()]
        return self.values[-1]


@dataclass
class TrialRun:
    """What an objective gets for one trial."""

    trial: optuna.Trial
    spec: StudySpec
    params: dict[str, Any]
    max_epochs: int
    device: str
    checkpoint_dir: Path
    cache: MutableMapping[str, Any]
    on_epoch: Callable[[int, Mapping[str, float]], None] | None = None
    # Context manager factory wrapped around storage writes (the worker defers signals there).
    shield: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    _stopper: EarlyStopping = field(init=False)
    _history: dict[str, list[float]] = field(init=False, default_factory=dict)
    _epochs_done: int = field(init=False, default=0)
    _flushed_epochs: int = field(init=False, default=0)
    _flushed_at: float = field(init=False, default_factory=time.monotonic)
    # train_seconds: this attempt's start, and the seconds restored from a checkpoint (resume).
    _started_at: float = field(init=False, default_factory=time.monotonic)
    _seconds_before: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._stopper = EarlyStopping(self.spec.early_stopping, self.spec.direction)

    @property
    def config(self) -> dict[str, Any]:
        """The study's fixed settings overlaid with this trial's parameters."""
        return self.spec.config_for(self.params)

    @property
    def data(self) -> dict[str, Any]:
        return dict(self.spec.data)

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def number(self) -> int:
        return self.trial.number

    def report(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Record epoch ``epoch`` (1-based); prune or early-stop. Returns True to stop training.

        Every metric of the study must be reported each epoch; the first one is the trial's
        intermediate value (what a pruner and early stopping see)."""
        if TRAIN_SECONDS in self.spec.metrics and TRAIN_SECONDS not in metrics:
            seconds = self._seconds_before + time.monotonic() - self._started_at
            metrics = {**metrics, TRAIN_SECONDS: seconds}
        for name in self.spec.metrics:
            if name not in metrics:
                raise KeyError(f"the objective reported {sorted(metrics)} but the study's metric is {name!r}")
        value = float(metrics[self.spec.metric])
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.spec.metric} is {value} at epoch {epoch}")
        for name, metric in metrics.items():
            self._history.setdefault(name, []).append(float(metric))
        self._epochs_done = epoch
        with self.shield():
            self.trial.report(value, epoch)
            if time.monotonic() - self._flushed_at >= METRICS_FLUSH_SECONDS:
                self.flush()
            should_prune = self.trial.should_prune()
        if self.on_epoch is not None:
            self.on_epoch(epoch, metrics)
        if should_prune:
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with {self.spec.metric}={value:.6g}")
        return self._stopper.update(value)

    def final_value(self) -> float:
        return self._stopper.result()

    def final_values(self) -> list[float]:
        """A multi-objective trial's values: every study metric at the epoch that scores the trial.

        That epoch is the one whose first-metric value the early-stopping rule scores (the last
        epoch without early stopping; the earliest epoch with that value on a tie), so the values
        are one model's, never mixed across epochs.
        """
        value = self.final_value()
        first = self._history.get(self.spec.metric, [])
        epoch = first.index(value) if value in first else len(first) - 1
        return [float(self._history[name][epoch]) for name in self.spec.metrics]

    def _write_metrics(self) -> None:
        # A system attribute plus a short user attribute: see hpo._records.
        write_trial_metrics(self.trial, self._history, self.spec.metric)
        self._flushed_at = time.monotonic()
        self._flushed_epochs = self._epochs_done

    def flush(self) -> None:
        """Store the metric history now (the worker calls this when the trial ends, however it ends).

        Nothing is written when the only metric is the study's own: the trial's intermediate
        values already hold it, epoch by epoch.
        """
        extra = set(self._history) - {self.spec.metric}
        if extra and self._flushed_epochs != self._epochs_done:
            with self.shield():
                self._write_metrics()

    def upload_artifact(self, path: str | Path) -> str:
        """Store the file ``path`` (a plot, a report, a final checkpoint) with this trial.

        It goes to the artifact folder (``$HPO_ARTIFACT_DIR``, default ``storage/artifacts``),
        where ``hpo dashboard`` lists and serves it on the trial's page. Returns the artifact id.
        """
        uploader = getattr(self.trial, "upload_artifact", None)
        if callable(uploader):  # in a worker's trainer process the worker uploads it
            return str(uploader(path))
        from hpo.artifacts import upload_trial_artifact  # imports optuna.artifacts only when used

        return upload_trial_artifact(self.trial, path)

    @property
    def history(self) -> dict[str, list[float]]:
        """Every metric reported so far, one value per epoch."""
        return {name: list(values) for name, values in self._history.items()}

    def resume(self, history: Mapping[str, list[float]]) -> int:
        """Re-record the epochs restored from a checkpoint (no pruning decision on them).

        Returns the number of epochs already done, so the loop continues after them.
        """
        values = list(history.get(self.spec.metric, []))
        with self.shield():
            for epoch, value in enumerate(values, start=1):
                self.trial.report(value, epoch)
                self._stopper.update(value)
            self._history = {name: list(v) for name, v in history.items()}
            self._epochs_done = len(values)
            seconds = self._history.get(TRAIN_SECONDS, [])
            if TRAIN_SECONDS in self.spec.metrics and len(seconds) == len(values):
                # The restored epochs' seconds count: train_seconds goes on from there.
                self._seconds_before, self._started_at = (seconds[-1] if seconds else 0.0), time.monotonic()
            self._write_metrics()
            self.trial.set_user_attr("resumed_from_epoch", len(values))
        return len(values)


def _known_objectives() -> Mapping[str, str]:
    """Objective names: ``objectives/__init__.py``'s REGISTRY and ``hpo.objectives`` entry points."""
    return known_objectives()


def resolve_objective(
    name: str,
    source: str = "study file",
    policy: ObjectivePolicy | None = None,
    search_path: Sequence[str] = (),
) -> Objective:
    """An objective from the registry in ``objectives/``, an ``hpo.objectives`` entry point, or a
    ``package.module:attribute`` path.

    With a ``policy`` (a worker running a definition from the storage), the objective must be
    allowed by it (:meth:`hpo.policy.ObjectivePolicy.check`), decided before anything is imported.
    Without one, the objective is trusted: it comes from a study file the user gave.
    ``search_path``: folders chosen on the user's side (never by the storage) where a module the
    installed packages lack is looked for (see :mod:`hpo._objective_path`).
    """
    target = policy.check(name, source) if policy is not None else lookup_target(name, source)
    module_name, _, attribute = target.partition(":")
    module = import_objective_module(module_name, search_path, source)
    obj = getattr(module, attribute, None)
    if obj is None:
        raise SpecError(source, "objective", f"module {module_name!r} has no attribute {attribute!r}")
    if isinstance(obj, Objective):
        return obj
    if callable(obj):
        return Objective(train=obj)
    raise SpecError(source, "objective", f"{target} is neither an Objective nor a function")


def _check_model(model: type[BaseModel], values: Mapping[str, Any], source: str, section: str) -> None:
    known = set(model.model_fields)
    for key in values:
        if key not in known:
            raise SpecError(
                source,
                f"{section}.{key}",
                "is not an option of this objective",
                f"known options: {', '.join(sorted(known))}",
            )
    try:
        model.model_validate(dict(values))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise SpecError(source, f"{section}.{loc}" if loc else section, first["msg"]) from None


def check_objective(
    spec: StudySpec, source: str, policy: ObjectivePolicy | None = None, search_path: Sequence[str] = ()
) -> Objective:
    """Resolve the objective (under ``policy`` when given, looking in ``search_path`` too, see
    :func:`resolve_objective`) and check the study's metric, settings and space against what it
    declares."""
    objective = resolve_objective(spec.objective, source, policy, search_path)
    declared = (*objective.metrics, *BUILTIN_METRICS)
    for i, metric in enumerate(spec.metrics):
        if objective.metrics and metric not in declared:
            close = difflib.get_close_matches(metric, declared, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            builtin = "" if close else f"; built in: {', '.join(BUILTIN_METRICS)}"
            raise SpecError(
                source,
                f"metric[{i}]" if spec.is_multi_objective else "metric",
                f"{metric!r} is not a metric this objective reports",
                f"{hint}declared metrics: {', '.join(objective.metrics)}{builtin}",
            )
    if objective.config is not None:
        known = set(objective.config.model_fields)
        for name in spec.space.names:
            if name not in known:
                raise SpecError(
                    source,
                    f"search_space.{name}",
                    "is not an option of this objective",
                    f"known options: {', '.join(sorted(known))}",
                )
        _check_model(objective.config, spec.settings, source, "settings")
    if objective.data is not None:
        _check_model(objective.data, spec.data, source, "data")
    return objective
