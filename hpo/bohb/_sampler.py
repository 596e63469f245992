"""BOHB as an Optuna sampler whose whole state lives in the study's storage."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from hpo import _optuna
from hpo.bohb import _trials
from hpo.bohb._continuation import continuation_attrs, unpromoted_kept
from hpo.bohb._handover import adopt_requeued
from hpo.bohb._kde import KdeModel, KdeOptions, Observation
from hpo.bohb._schedule import (
    Assignment,
    Bracket,
    HyperbandSchedule,
    budget_epochs,
    next_assignment,
)
from hpo.bohb._trials import (
    ADOPTED_BY_ATTR,
    DECISION_PREFIX,
    EVIDENCE_MODES,
    MODEL_PICK_ATTR,
    SLOT_ATTR,
    Evidence,
)
from hpo.objective import BUDGET_ATTR
from hpo.space import SearchSpace, from_optuna_distributions, to_optuna_distributions
from hpo.storage import study_lock

__all__ = ["ADOPTED_BY_ATTR", "MODEL_PICK_ATTR", "SLOT_ATTR", "BOHBSampler", "SlotWaitError", "trial_budget"]

# A trial waiting for a slot polls the storage after these many seconds, doubling up to the maximum.
_FIRST_POLL_S = 0.05
_MAX_POLL_S = 1.0
# Which search space a cached model is for: None for the sampler's own space, else the relative
# search space of a define-by-run study.
_SpaceKey = tuple[tuple[str, BaseDistribution], ...] | None


def trial_budget(trial: optuna.Trial | FrozenTrial) -> float | None:
    """The budget BOHB gave ``trial`` (None when the trial has no BOHB slot)."""
    if isinstance(trial, FrozenTrial):
        attrs = trial.system_attrs
    else:
        attrs = trial.storage.get_trial_system_attrs(_optuna.trial_id(trial))
    slot = attrs.get(SLOT_ATTR)
    return float(slot["budget"]) if isinstance(slot, dict) else None


class BOHBSampler(BaseSampler):
    """BOHB (Falkner, Klein and Hutter, 2018): Hyperband brackets choosing how long each trial
    trains, hpbandster's KDE model choosing what it trains.

    **With** ``search_space`` (how hpo's workers use it: ``sampler: {name: bohb}``), the sampler runs
    the Hyperband plan of :class:`~hpo.bohb.HyperbandSchedule` over ``min_budget``, ``max_budget`` and
    ``eta``. ``before_trial`` gives each new trial the next slot of the plan and records it in the
    trial's system attributes (``hpo:bohb``; its budget rounded to whole epochs in ``hpo:budget``);
    each planned parameter the objective suggests (its name with exactly its planned distribution)
    then gets its value in the slot's configuration, drawn once per trial: the parameters of a
    promoted configuration, or a new configuration from hpbandster's KDE, fed the finished
    evaluations (and, with ``evidence="every_epoch"``, their reported epochs) as hpbandster feeds
    them (an observation below a budget that has a model already is dropped). Parameters outside
    the planned space (another name, or a planned name with another distribution) are sampled
    independently at random, like TPE's independent fallback, so the sampler works with any
    objective (Optuna's sampler test suites pass). ``search_space`` is an hpo
    :class:`~hpo.space.SearchSpace` or a mapping of names to Optuna distributions. Nothing lives
    only in this object: every call rebuilds the plan and the model
    from the study's trials, so any number of workers, each with its own sampler, share one BOHB
    run through the storage, and a study resumes where it stopped. On an RDB storage, slots are
    handed out under a database lock (see :func:`hpo.storage.study_lock`).

    **Without** ``search_space`` it is a plain define-by-run Optuna sampler: the KDE models the
    search space common to the finished trials, all at one budget (no brackets), and parameters
    outside it are drawn at random.

    ``n_trials`` is the study's trial budget (hpo passes the study file's ``n_trials``). With it, a
    bracket is opened only when the trials left can fill all its slots, so every bracket's last stage
    is reached; trials left over when no whole bracket fits evaluate new configurations at
    ``max_budget`` (see :func:`hpo.bohb._schedule.next_assignment`). A new trial then sometimes has
    to wait: when every open bracket waits for a running stage to finish and the budget allows no
    new bracket, ``before_trial`` blocks, polling the storage, until a slot opens — at most
    ``wait_timeout`` seconds (None: no limit), after which it raises :class:`SlotWaitError`. While it
    waits, the trial keeps its heartbeat (if the storage has heartbeats), stale trials are failed as
    hpo's workers fail them, a re-queued trial that holds a slot is run by the waiting trial
    instead (so a rung never waits on a retry that no free worker is left to claim), and
    :attr:`wait_check`, if set, is called between polls: an exception it raises ends the wait (a
    worker's stop request; a caller that must not block, such as an event loop, can raise at once,
    put its trial back and try later). Without ``n_trials`` (the default) the plan is hpbandster's
    endless one and no trial ever waits.

    ``evidence`` is what the KDE models learn from: ``"every_epoch"`` (the default) adds every epoch
    a trial reported (its intermediate values, step = epoch) as an observation at the plan's budget
    it corresponds to, pruned and failed trials' epochs included; ``"paper"`` feeds only each
    evaluation's result at its own budget, a pruned trial counting as a crash, as hpbandster does
    (see :mod:`hpo.bohb._trials`). ``constant_liar`` (default True) counts the other trials still
    running, once they have their configuration, as bad evaluations: they join the "bad" density
    of the model a new configuration is drawn from, for that proposal only, so that workers
    proposing at the same time spread out (as Optuna's TPE ``constant_liar``); with one worker
    there is never such a trial.

    ``continuation`` (default True): a promoted configuration continues from the checkpoint its trial
    left at the previous stage (see :mod:`hpo._continuation`) instead of retraining from epoch 0 as
    hpbandster and the paper do (``continuation=False``); an objective that writes no checkpoint
    retrains either way.

    The KDE options keep hpbandster's names and defaults. ``seed`` makes proposals reproducible.
    """

    def __init__(
        self,
        search_space: SearchSpace | Mapping[str, BaseDistribution] | None = None,
        *,
        min_budget: float | None = None,
        max_budget: float | None = None,
        eta: float = 3,
        min_points_in_model: int | None = None,
        top_n_percent: int = 15,
        num_samples: int = 64,
        random_fraction: float = 1 / 3,
        bandwidth_factor: float = 3,
        min_bandwidth: float = 1e-3,
        seed: int | None = None,
        n_trials: int | None = None,
        wait_timeout: float | None = 24 * 3600.0,
        evidence: Evidence = "every_epoch",
        constant_liar: bool = True,
        continuation: bool = True,
    ) -> None:
        if evidence not in EVIDENCE_MODES:
            raise ValueError(f"evidence must be one of {', '.join(EVIDENCE_MODES)}, got {evidence!r}")
        if not isinstance(constant_liar, bool):
            raise ValueError(f"constant_liar must be true or false, got {constant_liar!r}")
        self._evidence: Evidence = evidence
        self._constant_liar = constant_liar
        if not isinstance(continuation, bool):
            raise ValueError(f"continuation must be true or false, got {continuation!r}")
        self._continuation = continuation
        self._options = KdeOptions(
            min_points_in_model=min_points_in_model,
            top_n_percent=top_n_percent,
            num_samples=num_samples,
            random_fraction=random_fraction,
            bandwidth_factor=bandwidth_factor,
            min_bandwidth=min_bandwidth,
        )
        if search_space is not None and not isinstance(search_space, SearchSpace):
            search_space = from_optuna_distributions(search_space)
        self._space = search_space
        # The planned distributions: a suggested parameter is planned only with exactly these.
        self._planned = {} if search_space is None else to_optuna_distributions(search_space)
        self._schedule: HyperbandSchedule | None = None
        if search_space is not None:
            if min_budget is None or max_budget is None:
                raise ValueError("BOHBSampler with a search_space needs min_budget and max_budget")
            for name, value in (("min_budget", min_budget), ("max_budget", max_budget), ("eta", eta)):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{name} must be a number, got {value!r}")
            self._schedule = HyperbandSchedule(float(min_budget), float(max_budget), eta)
        elif min_budget is not None or max_budget is not None:
            raise ValueError("min_budget and max_budget need a search_space to run brackets")
        if n_trials is not None and not _positive_int(n_trials):
            raise ValueError(f"n_trials must be a positive whole number, got {n_trials!r}")
        timeout_ok = isinstance(wait_timeout, int | float) and not isinstance(wait_timeout, bool)
        if wait_timeout is not None and not (timeout_ok and wait_timeout > 0):
            raise ValueError(f"wait_timeout must be a positive number of seconds or None, got {wait_timeout}")
        self._n_trials = n_trials
        self._wait_timeout = None if wait_timeout is None else float(wait_timeout)
        self._rng = np.random.RandomState(seed)
        # Parameters outside the model are drawn by a RandomSampler with a stream of its own (seeded
        # with ``seed`` itself it would repeat the draws of ``_rng``).
        self._random = RandomSampler(seed=None if seed is None else _stream_seed(seed, 1))
        self._intersection = IntersectionSearchSpace(include_pruned=True)
        # Per-object caches of derived data; each is checked against the storage before use.
        self._lock = threading.Lock()
        self._models: dict[_SpaceKey, KdeModel] = {}
        # Bracket mode: each running trial's planned configuration, drawn at its first planned
        # parameter, keyed by (study id, trial id); dropped in after_trial.
        self._configs: dict[tuple[int, int], dict[str, Any]] = {}
        #: Called between polls while a trial waits for a slot; an exception it raises ends the wait
        #: and leaves before_trial (a worker's stop request, a caller that must not block).
        self.wait_check: Callable[[], None] | None = None

    @property
    def schedule(self) -> HyperbandSchedule | None:
        """The Hyperband plan (None without a search space)."""
        return self._schedule

    @property
    def evidence(self) -> Evidence:
        """What the KDE models learn from: ``"every_epoch"`` or ``"paper"``."""
        return self._evidence

    @property
    def constant_liar(self) -> bool:
        """Whether other workers' running trials count as crashes for a new proposal."""
        return self._constant_liar

    @property
    def n_trials(self) -> int | None:
        """The trial budget the plan is fitted to (None: hpbandster's endless plan)."""
        return self._n_trials

    def bracket_plan(self, index: int) -> Bracket:
        """Bracket ``index`` of the plan; ``ValueError`` without a search space."""
        if self._schedule is None:
            raise ValueError("a BOHBSampler without a search space has no brackets")
        return self._schedule.bracket(index)

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()

    # ------------------------------------------------------------------ the plan
    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._schedule is None or isinstance(trial.system_attrs.get(SLOT_ATTR), dict):
            return  # no plan, or a re-queued trial that keeps the slot of the one it replaces
        _optuna.raise_if_multi_objective(self, study)
        storage = _optuna.study_storage(study)
        started = time.monotonic()
        delay = _FIRST_POLL_S
        heartbeat_s = _optuna.heartbeat_interval(storage)  # None: no heartbeats (off, or none at all)
        heartbeat = heartbeat_s is not None
        interval = float(heartbeat_s or 0)
        last_beat = last_stale_check = started
        while True:
            with self._lock, _plan_lock(study):
                if self._assign(study, trial):
                    return
            # Every open bracket waits for a running stage and the budget allows no new one.
            now = time.monotonic()
            if self._wait_timeout is not None and now - started >= self._wait_timeout:
                raise SlotWaitError(
                    f"BOHB: trial {trial.number} waited {now - started:.0f}s for a slot of the bracket plan "
                    "and got none: every open bracket is waiting for trials of a running stage to finish "
                    f"and the study's n_trials={self._n_trials} leaves no trials for another bracket "
                    "(fix: check that the workers running those trials are alive, or raise "
                    "sampler.options.wait_timeout)"
                )
            if heartbeat and now - last_beat >= interval / 2:
                # Keep this trial alive for the stale-trial check while it waits.
                _optuna.record_heartbeat(storage, _optuna.trial_id(trial))
                last_beat = now
            if heartbeat and now - last_stale_check >= interval:
                # A dead worker's trial would hold its stage for ever: fail (and re-queue) it, as
                # hpo's workers do, since every worker may be waiting here.
                _fail_stale(study)
                last_stale_check = now
            if self.wait_check is not None:
                self.wait_check()
            time.sleep(delay)
            delay = min(2 * delay, _MAX_POLL_S)

    def _assign(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Give ``trial`` its slot (under the plan lock); False when it has to wait for one."""
        assert self._schedule is not None
        storage = _optuna.study_storage(study)
        sid, tid = _optuna.study_id(study), _optuna.trial_id(trial)
        # The trial handed to before_trial was read before the plan lock was taken: another call
        # for the same trial may have given it a slot since. Only the storage knows.
        if isinstance(storage.get_trial_system_attrs(tid).get(SLOT_ATTR), dict):
            return True
        trials = storage.get_all_trials(sid, deepcopy=False)
        decisions = _trials.read_decisions(storage.get_study_system_attrs(sid))
        runs = _trials.slot_runs(trials, _trials.sign(study))
        assignment, decided = next_assignment(self._schedule, runs, decisions, self._n_trials)
        for key, configs in decided.items():
            storage.set_study_system_attr(
                sid, f"{DECISION_PREFIX}{key[0]}:{key[1]}", [list(c) for c in configs]
            )
        if assignment is not None:
            if self._continuation:  # written before the slot, which marks the trial as assigned
                for name, value in continuation_attrs(assignment, runs, self._schedule.max_budget).items():
                    storage.set_trial_system_attr(tid, name, value)
            storage.set_trial_system_attr(tid, SLOT_ATTR, _slot_attr(assignment))
            storage.set_trial_system_attr(tid, BUDGET_ATTR, budget_epochs(assignment.budget))
            return True
        current = next((t for t in trials if _optuna.trial_id(t) == tid), None)
        if current is not None and current.state != TrialState.RUNNING:
            raise SlotWaitError(
                f"BOHB: trial {trial.number} became {current.state.name} while it waited for a slot "
                "(failed as stale by another worker?); it gets no slot"
            )
        return adopt_requeued(study, trial, trials, runs)

    def released_trials(self, study: optuna.Study) -> set[int]:
        """Numbers of finished trials whose kept checkpoint no promotion will continue: their stage's
        promotions were decided without them (see :mod:`hpo._continuation`; the worker removes them)."""
        if self._schedule is None or not self._continuation:
            return set()
        storage = _optuna.study_storage(study)
        sid = _optuna.study_id(study)
        trials = storage.get_all_trials(sid, deepcopy=False)
        decisions = _trials.read_decisions(storage.get_study_system_attrs(sid))
        runs = _trials.slot_runs(trials, _trials.sign(study))
        return {t.number for t in unpromoted_kept(trials, runs, decisions)}

    # ------------------------------------------------------------------ sampling
    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        if self._space is not None:
            # Bracket mode samples its planned parameters in sample_independent (see there): a
            # relative search space would make Optuna refuse an objective that suggests a planned
            # name with another kind of distribution, instead of sampling it independently.
            return {}
        space = self._intersection.calculate(study)
        return {name: dist for name, dist in space.items() if not dist.single()}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        _optuna.raise_if_multi_objective(self, study)
        if not search_space:
            return {}
        if self._space is not None:
            return {name: self.sample_independent(study, trial, name, d) for name, d in search_space.items()}
        with self._lock:
            params = self._sample_free(study, trial, search_space)
        return {name: value for name, value in params.items() if name in search_space}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """In bracket mode, a planned parameter (its name and exactly its planned distribution) gets
        the value of the trial's slot configuration (a promoted configuration's, or one the KDE
        proposes, drawn once per trial for all its planned parameters); any other parameter, and
        every parameter outside the define-by-run model, is drawn at random, independently."""
        _optuna.raise_if_multi_objective(self, study)
        if self._planned.get(param_name) == param_distribution:
            key = (_optuna.study_id(study), _optuna.trial_id(trial))
            with self._lock:
                config = self._configs.get(key)
                if config is None:
                    config = self._configs[key] = self._sample_planned(study, trial)
            if param_name in config:  # else inactive in the planned configuration
                return config[param_name]
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        with self._lock:
            self._configs.pop((_optuna.study_id(study), _optuna.trial_id(trial)), None)

    def _sample_planned(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        assert self._space is not None and self._schedule is not None
        storage = _optuna.study_storage(study)
        # The trial object Optuna hands us predates before_trial: read the slot from the storage.
        slot = storage.get_trial_system_attrs(_optuna.trial_id(trial)).get(SLOT_ATTR)
        trials = storage.get_all_trials(_optuna.study_id(study), deepcopy=False)
        budget = self._schedule.max_budget
        if isinstance(slot, dict):
            config = _trials.config_id(slot["config"])
            known = _trials.config_params(trials, config, self._space, trial.number)
            if known is not None:
                return known  # a promoted configuration keeps its parameters
            budget = float(slot["budget"])
        codec = self._model(None, self._space).codec
        observations = self._planned_observations(study, trials)
        pending = _trials.planned_pending(trials, codec, trial.number) if self._constant_liar else []
        return self._propose(study, trial, None, observations, budget, pending)

    def observations(self, study: optuna.Study) -> list[Observation]:
        """What the KDE models of ``study`` are fed now (bracket mode), in feeding order: each
        observation's trial number, ConfigSpace values, budget and loss (+inf: crashed). Depends on
        :attr:`evidence`; hpbandster itself still drops those below a budget that has a model."""
        if self._space is None:
            raise ValueError("a BOHBSampler without a search space has no per-budget observations")
        storage = _optuna.study_storage(study)
        return self._planned_observations(
            study, storage.get_all_trials(_optuna.study_id(study), deepcopy=False)
        )

    def _planned_observations(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> list[Observation]:
        assert self._space is not None and self._schedule is not None
        codec = self._model(None, self._space).codec
        sign, budgets = _trials.sign(study), self._schedule.budgets
        return _trials.planned_observations(trials, codec, sign, budgets, self._evidence)

    def _sample_free(
        self, study: optuna.Study, trial: FrozenTrial, search_space: Mapping[str, BaseDistribution]
    ) -> dict[str, Any]:
        items = tuple(sorted(search_space.items()))
        codec = self._model(items, from_optuna_distributions(dict(items))).codec
        trials = _optuna.study_storage(study).get_all_trials(_optuna.study_id(study), deepcopy=False)
        observations = _trials.free_observations(trials, codec, search_space, _trials.sign(study))
        pending = []
        if self._constant_liar:
            pending = _trials.free_pending(trials, codec, search_space, trial.number)
        return self._propose(study, trial, items, observations, 0.0, pending)

    def _model(self, key: _SpaceKey, space: SearchSpace) -> KdeModel:
        if key not in self._models:
            # Imported on first use: ConfigSpace takes seconds to import, and loading a study file
            # (hpo status, hpo create-study) builds the sampler without ever sampling.
            from hpo.bohb._configspace import ConfigSpaceCodec

            self._models[key] = KdeModel(ConfigSpaceCodec(space), self._options)
        return self._models[key]

    def _propose(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        key: _SpaceKey,
        observations: Sequence[Observation],
        budget: float,
        pending: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        model = self._models[key]
        if not model.extends(observations):
            # The storage does not continue what this object saw (another process finished trials
            # in between, or clocks disagree): rebuild the model from the storage alone.
            model = self._models[key] = KdeModel(model.codec, self._options)
        model.feed(observations)
        values, model_based = model.propose(budget, int(self._rng.randint(2**31)), pending)
        _optuna.study_storage(study).set_trial_system_attr(
            _optuna.trial_id(trial), MODEL_PICK_ATTR, model_based
        )
        return model.codec.decode(values)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class SlotWaitError(RuntimeError):
    """A trial waited longer than ``wait_timeout`` for a slot of BOHB's plan, or stopped running
    (failed as stale by another worker) while it waited."""


# ---------------------------------------------------------------------- the state in the storage


def _slot_attr(assignment: Assignment) -> dict[str, Any]:
    return {
        "bracket": assignment.bracket,
        "stage": assignment.stage,
        "slot": assignment.slot,
        "config": list(assignment.config),
        "budget": assignment.budget,
        "promoted": assignment.promoted,
    }


@contextlib.contextmanager
def _plan_lock(study: optuna.Study) -> Iterator[None]:
    """Serialise handing out slots across processes and machines sharing an RDB storage."""
    backend = _optuna.rdb_backend(_optuna.study_storage(study))
    if backend is not None:
        with study_lock(backend, f"{study.study_name}#bohb-plan"):
            yield
    else:
        yield


def _fail_stale(study: optuna.Study) -> None:
    """Fail, and re-queue, the stale trials of dead workers the way hpo's workers do."""
    try:
        from hpo._rdb import fail_stale  # hpo's own: fails and queues the retry in one transaction
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)  # Optuna's, with the storage's stale-trial callback
    else:
        fail_stale(_optuna.study_storage(study), _optuna.study_id(study))


def _stream_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for random stream ``stream`` of a sampler seeded ``seed``."""
    return int(np.random.SeedSequence([seed % 2**64, stream]).generate_state(1, dtype=np.uint32)[0])
