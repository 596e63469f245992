"""The study's ``pruner:`` as a Ray Tune trial scheduler.

On Ray the scheduler decides which trials stop early; Optuna's pruner is not consulted. Each
supported pruner maps to the Ray scheduler that implements the same algorithm, with its options
translated; options without a Ray counterpart are reported and ignored.

==================== ============================================================
study ``pruner``     Ray scheduler
==================== ============================================================
none                 ``FIFOScheduler`` (every trial runs its full budget)
successive_halving   ``ASHAScheduler`` (asynchronous successive halving, 1 bracket)
hyperband            ``AsyncHyperBandScheduler`` with Optuna's number of brackets
median               ``MedianStoppingRule``
percentile, patient  no Ray counterpart: an error naming the supported pruners
==================== ============================================================

Optuna's ``HyperbandPruner`` runs its brackets asynchronously; Ray's asynchronous HyperBand is
the same algorithm. (Ray's synchronous ``HyperBandScheduler`` pauses trials at every rung and
restarts them from checkpoints, which re-trains objectives without checkpoints from scratch.)
Every scheduler counts time in the objective's epochs (:data:`EPOCH_KEY`), not in Ray's
``training_iteration``, so a trial restored from a checkpoint keeps its place in the rungs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ray.tune.schedulers import (
    ASHAScheduler,
    AsyncHyperBandScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    TrialScheduler,
)

from hpo.errors import HpoError
from hpo.spec import StudySpec

# The result key holding the objective's epoch (1-based), the schedulers' time attribute.
EPOCH_KEY = "epoch"
SUPPORTED_PRUNERS = ("none", "successive_halving", "hyperband", "median")


@dataclass(frozen=True)
class SchedulerPlan:
    """A configured scheduler plus the pruner options it could not honour."""

    scheduler: TrialScheduler
    name: str  # for messages, e.g. "ASHA (max_t=20, grace_period=1, reduction_factor=4)"
    ignored_options: tuple[str, ...]


def _int_option(options: dict[str, Any], key: str, default: int) -> int:
    value = options.pop(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HpoError(f"pruner.options.{key} must be an integer for --backend ray, got {value!r}")
    return value


def _min_resource(options: dict[str, Any], max_epochs: int) -> int:
    value = options.pop("min_resource", "auto")
    if value == "auto":
        # Optuna's own heuristic, applied to the study's epoch budget.
        return max(max_epochs // 100, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HpoError(f"pruner.options.min_resource must be 'auto' or an integer >= 1, got {value!r}")
    return value


def make_scheduler(spec: StudySpec) -> SchedulerPlan:
    """The Ray scheduler for the study's pruner (see the module docstring for the mapping).

    Raises :class:`HpoError` for pruners Ray has no scheduler for.
    """
    name = spec.pruner.name
    options = dict(spec.pruner.options)
    max_epochs = spec.budget.max_epochs
    settings: dict[str, Any]
    factory: type[TrialScheduler]
    if name == "none":
        return SchedulerPlan(FIFOScheduler(), "FIFO (no early stopping)", tuple(sorted(options)))
    if name == "successive_halving":
        min_resource = _min_resource(options, max_epochs)
        rate = _int_option(options, "min_early_stopping_rate", 0)
        factor = _int_option(options, "reduction_factor", 4)
        title, factory = "ASHA", ASHAScheduler
        settings = {
            "max_t": max_epochs,
            "grace_period": min(min_resource * factor**rate, max_epochs),
            "reduction_factor": factor,
            "brackets": 1,
        }
    elif name == "hyperband":
        min_resource = _int_option(options, "min_resource", 1)
        if options.get("max_resource") == "auto":
            del options["max_resource"]
        max_resource = _int_option(options, "max_resource", max_epochs)
        factor = _int_option(options, "reduction_factor", 3)
        if not 1 <= min_resource <= max_resource or factor < 2:
            raise HpoError(
                "pruner hyperband needs 1 <= min_resource <= max_resource and reduction_factor >= 2 "
                f"(got {min_resource}, {max_resource}, {factor})"
            )
        title, factory = "asynchronous HyperBand", AsyncHyperBandScheduler
        settings = {
            "max_t": max_resource,
            "grace_period": min_resource,
            "reduction_factor": factor,
            # Optuna's bracket count: floor(log_factor(max / min)) + 1.
            "brackets": math.floor(math.log(max_resource / min_resource, factor)) + 1,
        }
    elif name == "median":
        startup = _int_option(options, "n_startup_trials", 5)
        warmup = _int_option(options, "n_warmup_steps", 0)
        n_min = _int_option(options, "n_min_trials", 1)
        title, factory = "median stopping rule", MedianStoppingRule
        settings = {
            "grace_period": warmup,
            # Ray compares with the other trials that reached this epoch; Optuna waits for
            # n_startup_trials finished trials. Requiring that many comparisons is the closest fit.
            "min_samples_required": max(startup, n_min, 1),
        }
    else:
        raise HpoError(
            f"pruner {name!r} has no Ray Tune scheduler (fix: run this study with plain workers, "
            f"or use a study whose pruner is one of {', '.join(SUPPORTED_PRUNERS)})"
        )
    extra: dict[str, Any] = {}
    if factory is not MedianStoppingRule:
        # A trial that reaches max_t returns its own final value (early-stopping rule included)
        # instead of being cut off at its last report.
        extra["stop_last_trials"] = False
    scheduler = factory(time_attr=EPOCH_KEY, **settings, **extra)
    label = f"{title} ({', '.join(f'{k}={v}' for k, v in settings.items())})"
    for key, neutral in (("bootstrap_count", 0), ("interval_steps", 1)):
        if options.get(key) == neutral:  # the default: nothing is lost
            del options[key]
    return SchedulerPlan(scheduler, label, tuple(sorted(options)))
