"""Optuna's ``RDBStorage`` with the state changes hpo's guarantees rest on made atomic.

Optuna's own ``set_trial_state_values`` reads the trial with ``SELECT ... FOR UPDATE`` and writes
the new state in a second statement. PostgreSQL locks the row, but SQLite ignores ``FOR UPDATE``
and pysqlite opens its transaction only at the first write, so two processes can both see a trial
WAITING and both claim it (measured: 4 processes made 314 claims of 200 queued trials). Here every
state change is one conditional ``UPDATE ... WHERE state = <expected>`` whose row count says who
won, and everything that belongs to it is written in the same transaction:

* **claim** (WAITING -> RUNNING) records the claim's first heartbeat, so a worker killed right
  after claiming leaves a trial that turns stale like any other;
* **finish** (RUNNING/WAITING -> COMPLETE/PRUNED/FAIL) writes the values only if it won the row, so
  a worker whose lease expired cannot overwrite the FAIL that retried its trial;
* **fail and re-queue** (:meth:`HpoRDBStorage.fail_and_requeue`) fails a trial and queues its retry
  in one transaction, so a crash between the two never loses the retry.

Stale detection also covers RUNNING trials that never got a heartbeat row (claimed by plain
``study.ask()`` or by an older hpo), by their start time.

The schema stays Optuna's: the ``optuna`` CLI, optuna-dashboard and plain ``optuna.load_study``
read and write these databases as usual.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy import orm

from hpo._optuna import rdb_backend, rdb_engine, rdb_scoped_session, rdb_stale_trial_ids, stale_trial_ids
from hpo._optuna import rdb_models as models  # Optuna's ORM models of its own schema
from hpo._records import EPOCH_SECONDS_KEY, METRICS_KEY

# Trial system attributes of a retry: the trial it directly replaces (hpo's link), plus Optuna's
# RetryFailedTrialCallback names (the first attempt's number, and every attempt so far), which
# optuna-dashboard and hpo's checkpoint folders (hpo.studies.trial_checkpoint_dir) read.
RETRY_OF_ATTR = "hpo:retry_of"
FAILED_TRIAL_ATTR = "failed_trial"
RETRY_HISTORY_ATTR = "retry_history"
FAIL_REASON_ATTR = "fail_reason"
FIXED_PARAMS_ATTR = "fixed_params"  # Optuna's: a queued trial's preset parameters
WORKER_ATTR = "hpo:worker"  # which worker holds (held) the trial: host:pid[:slot]
# Set on the members of a fused group that ended for a cause no one member can be blamed for
# (its trainer process died; it ran past its time limit), saying what happened, and carried to
# their retries: each retry runs alone (hpo._fused_worker), so one poison member, or K members
# too big or too slow together, cannot fail the others' retries again.
RETRY_ALONE_ATTR = "hpo:retry_alone"
# System attributes that describe one attempt, not the configuration: a retry starts without them.
# (A retry's metric history is its own: a resumed retry re-records the restored epochs.)
ATTEMPT_ATTRS = frozenset(
    {FAIL_REASON_ATTR, WORKER_ATTR, "hpo:traceback", "hpo:heartbeat", METRICS_KEY, EPOCH_SECONDS_KEY}
)

T = TypeVar("T")

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def utcnow() -> datetime.datetime:
    """Naive UTC, the way Optuna's schema stores trial datetimes."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class FailOutcome:
    """What :meth:`HpoRDBStorage.fail_and_requeue` did."""

    failed: bool  # False: the trial was not in an expected state (someone else finished it)
    retry_trial_id: int | None = None  # the queued retry, None when none was queued
    reason: str = ""  # the fail reason as recorded


class HpoRDBStorage(RDBStorage):
    """``RDBStorage`` whose state changes are single conditional updates (see the module docstring).

    ``max_retry`` bounds how often one configuration is re-queued after its attempt died (counted
    over the whole chain of retries); ``None`` re-queues without limit.
    """

    def __init__(self, *args: Any, max_retry: int | None = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_retry = max_retry

    # ------------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[orm.Session]:
        factory = rdb_scoped_session(self)
        assert factory is not None  # an RDBStorage always has one
        session = factory()
        try:
            yield session
            session.commit()
        except sqlalchemy.exc.SQLAlchemyError as exc:
            session.rollback()
            # As Optuna's RDBStorage does: database errors surface as StorageInternalError.
            raise optuna.exceptions.StorageInternalError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @staticmethod
    def _state_of(session: orm.Session, trial_id: int) -> TrialState:
        trials = models.TrialModel.__table__
        state = session.execute(
            sqlalchemy.select(trials.c.state).where(trials.c.trial_id == trial_id)
        ).scalar_one_or_none()
        if state is None:
            raise KeyError(f"no trial with trial_id {trial_id}")
        return TrialState(state) if not isinstance(state, TrialState) else state

    def _engine(self) -> sqlalchemy.Engine:
        engine = rdb_engine(self)
        assert engine is not None  # an RDBStorage always has one
        return engine

    def _trials_of(self, query: Any) -> list[tuple[int, int]]:
        """(trial_id, number) rows of a SELECT of those two columns."""
        with self._engine().connect() as conn:
            return [(int(row[0]), int(row[1])) for row in conn.execute(query)]

    # ------------------------------------------------------------------ state changes
    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if state == TrialState.RUNNING:
            return self.claim(trial_id)
        trials = models.TrialModel.__table__
        now = utcnow()
        changes: dict[str, Any] = {"state": state}
        if state.is_finished():
            changes["datetime_complete"] = now
        with self._transaction() as session:
            won = _rowcount(
                session.execute(
                    sqlalchemy.update(trials)
                    .where(trials.c.trial_id == trial_id, trials.c.state.notin_(_FINISHED))
                    .values(**changes)
                )
            )
            if won != 1:
                self._state_of(session, trial_id)  # KeyError when there is no such trial
                raise optuna.exceptions.UpdateFinishedTrialError(
                    f"trial {trial_id} is already finished; it cannot be updated"
                )
            if values is not None:
                _write_values(session, trial_id, values)
        return True

    def claim(self, trial_id: int, worker: str | None = None) -> bool:
        """Move a WAITING trial to RUNNING and record its first heartbeat (and, given ``worker``,
        the claimer in the ``hpo:worker`` system attribute), in one transaction.

        True when this call won the trial; False when another worker holds it; raises
        ``UpdateFinishedTrialError`` when it is finished.
        """
        trials = models.TrialModel.__table__
        beats = models.TrialHeartbeatModel.__table__
        with self._transaction() as session:
            won = _rowcount(
                session.execute(
                    sqlalchemy.update(trials)
                    .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.WAITING)
                    .values(state=TrialState.RUNNING, datetime_start=utcnow())
                )
            )
            if won != 1:
                if self._state_of(session, trial_id).is_finished():
                    raise optuna.exceptions.UpdateFinishedTrialError(
                        f"trial {trial_id} is already finished; it cannot be claimed"
                    )
                return False
            if self.heartbeat_interval is not None:
                session.execute(sqlalchemy.delete(beats).where(beats.c.trial_id == trial_id))
                session.execute(sqlalchemy.insert(beats).values(trial_id=trial_id))
            if worker is not None:
                _set_attr(session, models.TrialSystemAttributeModel, trial_id, WORKER_ATTR, worker)
        return True

    def set_trial_params(self, trial_id: int, params: Sequence[tuple[str, float, BaseDistribution]]) -> None:
        """Write a trial's sampled parameters (``(name, internal value, distribution)``) in one
        transaction, as Optuna's ``set_trial_param`` writes one: refused for a finished trial,
        each distribution checked against the study's earlier one of that name.

        All or none: a worker killed while preparing a trial never leaves it with part of its
        configuration. Repeatable: a parameter the trial already holds with the same value and
        distribution (the first attempt committed, its answer was lost) is skipped; one it holds
        with another value raises ``ValueError``.
        """
        trials = models.TrialModel.__table__
        table = models.TrialParamModel.__table__
        with self._transaction() as session:
            # A no-op update of an unfinished trial: takes its row (the database, on SQLite) for
            # this transaction, so nobody finishes the trial between this check and the inserts.
            locked = session.execute(
                sqlalchemy.update(trials)
                .where(trials.c.trial_id == trial_id, trials.c.state.notin_(_FINISHED))
                .values(state=trials.c.state)
            )
            if _rowcount(locked) != 1:
                self._state_of(session, trial_id)  # KeyError when there is no such trial
                raise optuna.exceptions.UpdateFinishedTrialError(
                    f"trial {trial_id} is already finished; its parameters cannot be set"
                )
            columns = (table.c.param_name, table.c.param_value, table.c.distribution_json)
            held = {
                str(row[0]): (float(row[1]), str(row[2]))
                for row in session.execute(sqlalchemy.select(*columns).where(table.c.trial_id == trial_id))
            }
            study = sqlalchemy.select(trials.c.study_id).where(trials.c.trial_id == trial_id)
            for name, value, distribution in params:
                as_json = optuna.distributions.distribution_to_json(distribution)
                if name in held:
                    if not _same_param(held[name], value, as_json):
                        raise ValueError(
                            f"trial {trial_id} already has parameter {name!r} with another value "
                            "or distribution"
                        )
                    continue
                earlier = session.execute(
                    sqlalchemy.select(table.c.distribution_json)
                    .join(trials, trials.c.trial_id == table.c.trial_id)
                    .where(trials.c.study_id == study.scalar_subquery(), table.c.param_name == name)
                    .limit(1)
                ).scalar_one_or_none()
                if earlier is not None:
                    before = optuna.distributions.json_to_distribution(earlier)
                    try:
                        optuna.distributions.check_distribution_compatibility(before, distribution)
                    except ValueError as exc:
                        raise ValueError(
                            f"parameter {name!r}: {exc} (earlier trials of the study drew it from {before}, "
                            f"this one from {distribution})"
                        ) from exc
                session.execute(
                    sqlalchemy.insert(table).values(
                        trial_id=trial_id, param_name=name, param_value=value, distribution_json=as_json
                    )
                )

    def claim_next(
        self,
        study_id: int,
        limit: int = 16,
        worker: str | None = None,
        accept: Callable[[dict[str, Any] | None], bool] | None = None,
    ) -> tuple[int, int] | None:
        """Claim one WAITING trial of the study: retries first, then the oldest; (id, number).

        ``accept`` (``hpo worker --fuse``: a trial that can join the group) narrows the choice
        to the candidates it accepts, given each one's fixed parameters (Optuna's
        ``fixed_params``: a grid point, an enqueued configuration) or None for an empty slot
        (parameters still to be drawn); None when it accepts none of the first ``limit``.
        """
        trials = models.TrialModel.__table__
        attrs = models.TrialSystemAttributeModel.__table__
        retry = (
            sqlalchemy.select(attrs.c.trial_id)
            .where(attrs.c.trial_id == trials.c.trial_id, attrs.c.key == FAILED_TRIAL_ATTR)
            .exists()
        )
        fixed = (
            sqlalchemy.select(attrs.c.value_json)
            .where(attrs.c.trial_id == trials.c.trial_id, attrs.c.key == FIXED_PARAMS_ATTR)
            .limit(1)
            .scalar_subquery()
        )
        query = (
            sqlalchemy.select(trials.c.trial_id, trials.c.number, fixed)
            .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING)
            # Retries of trials whose worker died come first: they resume from a checkpoint,
            # and multi-fidelity samplers (BOHB) wait on them to finish a rung.
            .order_by(sqlalchemy.case((retry, 0), else_=1), trials.c.trial_id)
            .limit(limit)
        )
        while True:
            with self._engine().connect() as conn:
                rows = [(int(row[0]), int(row[1]), row[2]) for row in conn.execute(query)]
            if not rows:
                return None
            candidates = [
                (trial_id, number)
                for trial_id, number, fixed_json in rows
                if accept is None or accept(_fixed_params(fixed_json))
            ]
            if not candidates:
                return None
            for trial_id, number in candidates:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    if self.claim(trial_id, worker):
                        return trial_id, number
            # every candidate was taken by other workers meanwhile: look again

    def fill_empty_slot(self, study_id: int, params: dict[str, Any]) -> int | None:
        """Fix ``params`` (Optuna's ``fixed_params`` system attribute) on the oldest empty WAITING
        slot of the study; its trial number, or None when no empty slot is left.

        A slot is empty when it is WAITING, not a retry and has neither parameters nor non-empty
        ``fixed_params``. Each attempt is one transaction that first locks the trial row with a
        conditional no-op ``UPDATE ... WHERE state = WAITING`` (a claim racing it waits, then
        reads the fixed parameters), then re-checks emptiness before writing.
        """
        trials = models.TrialModel.__table__
        attrs = models.TrialSystemAttributeModel.__table__
        values = models.TrialParamModel.__table__
        marked = (
            sqlalchemy.select(attrs.c.trial_id)
            .where(
                attrs.c.trial_id == trials.c.trial_id,
                sqlalchemy.or_(
                    attrs.c.key == FAILED_TRIAL_ATTR,
                    # Optuna's enqueue_trial({}) (an empty slot) stores fixed_params {}.
                    sqlalchemy.and_(attrs.c.key == "fixed_params", attrs.c.value_json != "{}"),
                ),
            )
            .exists()
        )
        has_params = (
            sqlalchemy.select(values.c.trial_id).where(values.c.trial_id == trials.c.trial_id).exists()
        )
        query = (
            sqlalchemy.select(trials.c.trial_id, trials.c.number)
            .where(
                trials.c.study_id == study_id,
                trials.c.state == TrialState.WAITING,
                ~marked,
                ~has_params,
            )
            .order_by(trials.c.trial_id)
            .limit(16)
        )
        while True:
            candidates = self._trials_of(query)
            if not candidates:
                return None
            for trial_id, number in candidates:
                with self._transaction() as session:
                    locked = _rowcount(
                        session.execute(
                            sqlalchemy.update(trials)
                            .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.WAITING)
                            .values(state=TrialState.WAITING)
                        )
                    )
                    still_empty = (
                        locked == 1
                        and not session.execute(
                            sqlalchemy.select(trials.c.trial_id).where(
                                trials.c.trial_id == trial_id, sqlalchemy.or_(marked, has_params)
                            )
                        ).first()
                    )
                    if still_empty:
                        _set_attr(session, models.TrialSystemAttributeModel, trial_id, "fixed_params", params)
                        return number
            # every candidate was claimed or filled meanwhile: look again

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = set(rdb_stale_trial_ids(self, study_id))  # Optuna's: heartbeats older than grace
        grace = self.grace_period if self.grace_period is not None else 2 * (self.heartbeat_interval or 0)
        trials = models.TrialModel.__table__
        beats = models.TrialHeartbeatModel.__table__
        # RUNNING without any heartbeat row: claimed by something that never beat (plain
        # study.ask(), an older hpo); judged by its start time (the claimer's clock).
        never_beat = (
            sqlalchemy.select(trials.c.trial_id)
            .outerjoin(beats, beats.c.trial_id == trials.c.trial_id)
            .where(
                trials.c.study_id == study_id,
                trials.c.state == TrialState.RUNNING,
                beats.c.trial_id.is_(None),
                trials.c.datetime_start < utcnow() - datetime.timedelta(seconds=grace),
            )
        )
        with self._engine().connect() as conn:
            stale.update(int(row[0]) for row in conn.execute(never_beat))
        return sorted(stale)

    def fail_and_requeue(
        self,
        trial_id: int,
        reason: str,
        *,
        retry: bool = True,
        expected: Sequence[TrialState] = (TrialState.RUNNING,),
    ) -> FailOutcome:
        """Fail the trial (if it is in an ``expected`` state) and queue its retry, atomically.

        The retry gets the same parameters and the configuration's system attributes (a BOHB slot,
        an epoch budget), links to the attempt it replaces (``hpo:retry_of``, ``failed_trial``,
        ``retry_history``) and starts clean: no user attributes, no fail reason, no values. When the
        chain has used ``max_retry`` retries no retry is queued and the reason says so.
        """
        trials = models.TrialModel.__table__
        with self._transaction() as session:
            won = _rowcount(
                session.execute(
                    sqlalchemy.update(trials)
                    .where(trials.c.trial_id == trial_id, trials.c.state.in_(tuple(expected)))
                    .values(state=TrialState.FAIL, datetime_complete=utcnow())
                )
            )
            if won != 1:
                return FailOutcome(False)
            trial = session.get(models.TrialModel, trial_id)
            assert trial is not None  # the update above just matched it
            system = {a.key: json.loads(a.value_json) for a in trial.system_attributes}
            history = [*system.get(RETRY_HISTORY_ATTR, []), trial.number]
            retry_id = None
            if retry and (self.max_retry is None or len(history) <= self.max_retry):
                retry_id = self._queue_retry(session, trial, system, history)
            elif retry:
                reason = f"{reason}; not retried: all {self.max_retry} retries of this configuration used"
            _set_attr(session, models.TrialSystemAttributeModel, trial_id, FAIL_REASON_ATTR, reason)
            _set_attr(session, models.TrialUserAttributeModel, trial_id, FAIL_REASON_ATTR, reason)
        return FailOutcome(True, retry_id, reason)

    def _queue_retry(
        self,
        session: orm.Session,
        trial: models.TrialModel,
        system: dict[str, Any],
        history: list[int],
    ) -> int:
        # Lock the study row, as Optuna's own trial creation does: trial numbers are counted.
        models.StudyModel.find_or_raise_by_id(int(trial.study_id), session, for_update=True)
        retry = models.TrialModel(study_id=trial.study_id, number=None, state=TrialState.WAITING)
        session.add(retry)
        session.flush()
        retry.number = retry.count_past_trials(session)
        for param in trial.params:
            session.add(
                models.TrialParamModel(
                    trial_id=retry.trial_id,
                    param_name=param.param_name,
                    param_value=param.param_value,
                    distribution_json=param.distribution_json,
                )
            )
        carried = {k: v for k, v in system.items() if k not in ATTEMPT_ATTRS}
        carried[FAILED_TRIAL_ATTR] = system.get(FAILED_TRIAL_ATTR, trial.number)
        carried[RETRY_HISTORY_ATTR] = history
        carried[RETRY_OF_ATTR] = trial.number
        for key, value in carried.items():
            session.add(
                models.TrialSystemAttributeModel(
                    trial_id=retry.trial_id, key=key, value_json=json.dumps(value)
                )
            )
        session.flush()
        return int(retry.trial_id)


def _rowcount(result: Any) -> int:
    """Rows matched by an UPDATE (SQLAlchemy's CursorResult; typed as the generic Result)."""
    return int(result.rowcount)


def _fixed_params(value_json: Any) -> dict[str, Any] | None:
    """A queued trial's ``fixed_params`` attribute, None when it has none (or an empty one)."""
    if value_json is None:
        return None
    value = json.loads(value_json)
    return value if isinstance(value, dict) and value else None


def _same_param(held: tuple[float, str], value: float, as_json: str) -> bool:
    """Whether a stored parameter is ``value`` from the distribution ``as_json``: the same
    distribution, and the value equal up to the float precision the column stores."""
    stored, stored_json = held
    same_distribution = optuna.distributions.json_to_distribution(
        stored_json
    ) == optuna.distributions.json_to_distribution(as_json)
    return same_distribution and math.isclose(stored, float(value), rel_tol=1e-6, abs_tol=0.0)


def _set_attr(session: orm.Session, model: Any, trial_id: int, key: str, value: Any) -> None:
    table = model.__table__
    session.execute(sqlalchemy.delete(table).where(table.c.trial_id == trial_id, table.c.key == key))
    session.execute(sqlalchemy.insert(table).values(trial_id=trial_id, key=key, value_json=json.dumps(value)))


def _write_values(session: orm.Session, trial_id: int, values: Sequence[float]) -> None:
    table = models.TrialValueModel.__table__
    session.execute(sqlalchemy.delete(table).where(table.c.trial_id == trial_id))
    for objective, value in enumerate(values):
        stored, value_type = models.TrialValueModel.value_to_stored_repr(value)
        session.execute(
            sqlalchemy.insert(table).values(
                trial_id=trial_id, objective=objective, value=stored, value_type=value_type
            )
        )


def fail_stale(storage: Any, study_id: int, grace_period: float | None = None) -> list[FailOutcome]:
    """Fail (and re-queue) every stale trial of the study; each in one transaction.

    ``storage`` is an :class:`HpoRDBStorage` or anything wrapping one (Optuna's cache, hpo's
    retrying storage); other storages are left alone (the gRPC proxy's server does this itself).
    """
    rdb = rdb_of(storage)
    if rdb is None or rdb.heartbeat_interval is None:
        return []
    grace = rdb.grace_period if rdb.grace_period is not None else 2 * rdb.heartbeat_interval
    reason = (
        f"its worker stopped sending heartbeats (none for more than {grace_period or grace}s): "
        "killed, out of memory, or cut off from the database"
    )
    outcomes = []
    for trial_id in stale_trial_ids(rdb, study_id):
        outcome = rdb.fail_and_requeue(trial_id, reason)
        if outcome.failed:
            outcomes.append(outcome)
    return outcomes


def with_retries(storage: Any, fn: Callable[[], T]) -> T:
    """``fn()`` (raw SQL on the database) with the storage's retries (``hpo.resilient``'s
    ``RetryingStorage.call``) when it has them; ``fn`` must be safe to repeat."""
    call = getattr(storage, "call", None)
    return call(fn) if callable(call) and hasattr(storage, "inner") else fn()


def set_trial_params(
    storage: Any, trial_id: int, params: Sequence[tuple[str, float, BaseDistribution]]
) -> None:
    """Write ``params`` (``hpo._optuna.deferred_param_writes``) of the trial: in one transaction
    on a database (:meth:`HpoRDBStorage.set_trial_params`, with the storage's retries), one call
    each through other storages (the gRPC proxy)."""
    if not params:
        return
    rdb = rdb_of(storage)
    if rdb is None:
        for name, value, distribution in params:
            storage.set_trial_param(trial_id, name, value, distribution)
        return
    with_retries(storage, lambda: rdb.set_trial_params(trial_id, params))


def rdb_of(storage: Any) -> HpoRDBStorage | None:
    """The :class:`HpoRDBStorage` behind ``storage`` (unwrapping caches and retry layers)."""
    rdb = rdb_backend(storage)
    return rdb if isinstance(rdb, HpoRDBStorage) else None
