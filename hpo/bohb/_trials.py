"""BOHB's state read back out of the study's trials: slots, promotion decisions, and the evidence
the KDE models learn from.

What the models are fed (``evidence``):

* ``"paper"``: hpbandster's and the paper's rule. Each finished evaluation is one observation at its
  slot's budget: its value when it completed, a crash (loss +inf) when it was pruned or failed.
* ``"every_epoch"``: every epoch a trial reported (Optuna's intermediate values, step = epoch,
  1-based as ``run.report`` writes them) is evidence at the plan's budget it corresponds to: a trial
  that reached epoch ``budget_epochs(b)`` of a lower budget ``b`` is an observation at ``b``, whether
  it went on to complete, was pruned or failed. At its own slot's budget a trial counts as in the
  paper (its value; +inf when it did not complete), except that a pruned or failed trial that had
  reported that budget's last epoch counts with that value. A configuration is observed at most
  once per budget (the first observation in completion order): a promoted configuration retrained
  from scratch repeats the epochs of its earlier stages, and would otherwise weigh twice.

Both keep hpbandster's feeding order (trials in the order they finished; a trial's observations
from its lowest budget up), so hpbandster's ``new_result`` still drops what arrives below the
largest budget that already has a model: such a model is never used again for proposals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo import _optuna
from hpo.bohb._kde import Observation
from hpo.bohb._schedule import ConfigId, RungKey, SlotRun, budget_epochs, latest_runs
from hpo.space import SearchSpace, to_optuna_distributions

if TYPE_CHECKING:
    import optuna

    from hpo.bohb._configspace import ConfigSpaceCodec

Evidence = Literal["every_epoch", "paper"]
EVIDENCE_MODES: tuple[Evidence, ...] = ("every_epoch", "paper")

# Trial system attribute holding the trial's slot of the plan:
# {"bracket", "stage", "slot", "config": [bracket, stage, index], "budget", "promoted"}, and
# "attempt" when the slot was handed on to a waiting trial (see _handover.adopt_requeued).
SLOT_ATTR = "hpo:bohb"
# Trial system attribute of a re-queued trial whose slot a waiting trial took over: that trial's number.
ADOPTED_BY_ATTR = "hpo:bohb:adopted_by"
# Trial system attribute: whether the KDE chose the configuration (False: drawn at random).
MODEL_PICK_ATTR = "hpo:bohb:model_based_pick"
# Study system attributes "hpo:bohb:promoted:<bracket>:<stage>": the configurations promoted into a
# stage, decided once, by the first worker that found the previous stage finished.
DECISION_PREFIX = "hpo:bohb:promoted:"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def sign(study: optuna.Study) -> float:
    return 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0


def loss(trial: FrozenTrial, sign: float) -> float:
    """hpbandster's loss: the value (negated when maximizing); +inf unless it completed finitely."""
    if trial.state != TrialState.COMPLETE or trial.value is None or not math.isfinite(trial.value):
        return math.inf
    return sign * trial.value


def completion_order(trial: FrozenTrial) -> tuple[float, int]:
    done = trial.datetime_complete
    return (done.timestamp() if done is not None else math.inf, trial.number)


def slot_runs(trials: Sequence[FrozenTrial], sign: float) -> list[SlotRun]:
    runs = []
    for trial in trials:
        slot = trial.system_attrs.get(SLOT_ATTR)
        if not isinstance(slot, dict):
            continue
        runs.append(
            SlotRun(
                number=trial.number,
                bracket=int(slot["bracket"]),
                stage=int(slot["stage"]),
                slot=int(slot["slot"]),
                config=config_id(slot["config"]),
                finished=trial.state.is_finished(),
                loss=loss(trial, sign),
                attempt=int(slot.get("attempt", 0)),
            )
        )
    return runs


def config_id(raw: Sequence[int]) -> ConfigId:
    bracket, stage, index = (int(part) for part in raw)
    return (bracket, stage, index)


def read_decisions(attrs: Mapping[str, Any]) -> dict[RungKey, tuple[ConfigId, ...]]:
    decisions: dict[RungKey, tuple[ConfigId, ...]] = {}
    for key, value in attrs.items():
        if key.startswith(DECISION_PREFIX):
            bracket, stage = (int(part) for part in key.removeprefix(DECISION_PREFIX).split(":"))
            decisions[(bracket, stage)] = tuple(config_id(config) for config in value)
    return decisions


def config_params(
    trials: Sequence[FrozenTrial], config: ConfigId, space: SearchSpace, exclude: int
) -> dict[str, Any] | None:
    """The parameters of configuration ``config``: those of its earliest trial that has them all."""
    planned = to_optuna_distributions(space)
    for trial in sorted(trials, key=lambda t: t.number):
        slot = trial.system_attrs.get(SLOT_ATTR)
        if trial.number == exclude or not isinstance(slot, dict) or config_id(slot["config"]) != config:
            continue
        params = planned_params(trial, planned)
        try:
            space.validate_config(params)
        except ValueError:
            continue
        return params
    return None


def planned_observations(
    trials: Sequence[FrozenTrial],
    codec: ConfigSpaceCodec,
    sign: float,
    budgets: Sequence[float],
    evidence: Evidence,
) -> list[Observation]:
    """The evidence of the current attempt of every finished slot, in the order the trials finished
    (see the module's docstring); ``budgets`` are the plan's budgets."""
    by_number = {trial.number: trial for trial in trials}
    latest = latest_runs(slot_runs(trials, sign)).values()
    current = [by_number[run.number] for run in latest if run.finished]
    planned = to_optuna_distributions(codec.space)
    observations = []
    seen: set[tuple[ConfigId, float]] = set()
    for trial in sorted(current, key=completion_order):
        try:
            values = frozen(codec.encode(planned_params(trial, planned)))
        except ValueError:
            continue  # failed before its parameters were drawn: there is nothing to learn from
        slot = trial.system_attrs[SLOT_ATTR]
        budget = float(slot["budget"])
        if evidence == "paper":
            observations.append(Observation(trial.number, values, budget, loss(trial, sign)))
            continue
        config = config_id(slot["config"])
        for at, value in _epoch_losses(trial, budget, budgets, sign):
            if (config, at) not in seen:
                seen.add((config, at))
                observations.append(Observation(trial.number, values, at, value))
    return observations


def _epoch_losses(
    trial: FrozenTrial, budget: float, budgets: Sequence[float], sign: float
) -> list[tuple[float, float]]:
    """``trial``'s losses at the plan's budgets up to its own, lowest first (see the module)."""
    steps = trial.intermediate_values
    out = []
    for lower in sorted(b for b in budgets if b < budget and not math.isclose(b, budget)):
        value = steps.get(budget_epochs(lower))
        if value is not None:
            out.append((lower, _finite_loss(value, sign)))
    own = loss(trial, sign)
    if trial.state != TrialState.COMPLETE:
        reached = steps.get(budget_epochs(budget))
        own = math.inf if reached is None else _finite_loss(reached, sign)
    out.append((budget, own))
    return out


def _finite_loss(value: float, sign: float) -> float:
    return sign * value if math.isfinite(value) else math.inf


def planned_pending(
    trials: Sequence[FrozenTrial], codec: ConfigSpaceCodec, exclude: int
) -> list[dict[str, Any]]:
    """ConfigSpace values of the other running trials whose configuration is drawn already (the
    constant liar's pending evaluations), in trial-number order."""
    planned = to_optuna_distributions(codec.space)
    pending = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state != TrialState.RUNNING or trial.number == exclude:
            continue
        params = planned_params(trial, planned)
        if not params:
            continue  # its objective has not asked for its configuration yet
        try:
            pending.append(codec.encode(params))
        except ValueError:
            continue  # drawn only in part so far: it has not proposed its configuration yet
    return pending


def free_observations(
    trials: Sequence[FrozenTrial],
    codec: ConfigSpaceCodec,
    search_space: Mapping[str, BaseDistribution],
    sign: float,
) -> list[Observation]:
    """Define-by-run mode: each finished trial inside ``search_space``, all at one budget (0)."""
    observations = []
    for past in sorted((t for t in trials if t.state in FINISHED), key=completion_order):
        values = _encoded_within(past, codec, search_space)
        if values is not None:
            # Without a plan every trial ran at the same (unknown) budget: one model.
            observations.append(Observation(past.number, frozen(values), 0.0, loss(past, sign)))
    return observations


def free_pending(
    trials: Sequence[FrozenTrial],
    codec: ConfigSpaceCodec,
    search_space: Mapping[str, BaseDistribution],
    exclude: int,
) -> list[dict[str, Any]]:
    """Define-by-run mode: the other running trials that have values for all of ``search_space``."""
    pending = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == TrialState.RUNNING and trial.number != exclude:
            values = _encoded_within(trial, codec, search_space)
            if values is not None:
                pending.append(values)
    return pending


def _encoded_within(
    trial: FrozenTrial, codec: ConfigSpaceCodec, search_space: Mapping[str, BaseDistribution]
) -> dict[str, Any] | None:
    params = params_within(trial, search_space)
    if params is None:
        return None
    try:
        return codec.encode(params)
    except ValueError:
        return None


def planned_params(trial: FrozenTrial, planned: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """``trial``'s parameters that belong to the ``planned`` distributions: their names, suggested
    with exactly the planned distribution (others were sampled independently, outside the model)."""
    return {
        name: value
        for name, value in trial.params.items()
        if name in planned and trial.distributions.get(name) == planned[name]
    }


def frozen(values: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(values.items()))


def params_within(trial: FrozenTrial, search_space: Mapping[str, BaseDistribution]) -> dict[str, Any] | None:
    """``trial``'s values for every parameter of ``search_space``, if all lie inside it."""
    params = {}
    for name, dist in search_space.items():
        if name not in trial.params:
            return None
        value = trial.params[name]
        try:
            if not _optuna.distribution_contains(dist, value):
                return None
        except (ValueError, TypeError):
            return None
        params[name] = value
    return params
