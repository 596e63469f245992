"""hpo's long records of a study and of its trials: where they are stored, and the one way to read them.

Optuna's user attributes are what ``optuna studies``, ``optuna trials`` and optuna-dashboard show
as attributes, one value per cell. hpo's long values (a study's whole definition, its lifecycle
history, a trial's metric history epoch by epoch) made those cells thousands of characters wide,
so they are stored as **system attributes**, which those tools do not render:

=========================  ==========================  ==========================================
record                     where                       legacy place (still read)
=========================  ==========================  ==========================================
study definition           study system ``hpo:definition``   study user attr ``hpo:definition``
lifecycle history          study system ``hpo:history``      study user attr ``hpo:history``
metric history             trial system ``hpo:metrics``      trial user attr ``metrics``
epoch seconds (compare)    trial system ``hpo:epoch_seconds``  trial user attr ``hpo:epoch_seconds``
=========================  ==========================  ==========================================

What stays a user attribute is short: the study's ``hpo:uid``, and each trial's ``last_epoch``
(the last epoch's metrics, rounded, at most :data:`SUMMARY_MAX_CHARS` characters). Studies written
before this layout are read through the legacy places; writing a study's definition again (extend,
retrain) moves it and deletes the legacy user attribute in the same transaction.

Every reader goes through this module (``hpo status``/``export``, lifecycle, retrain, compare,
resume checks), so the layout is decided here only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from hpo import _optuna

DEFINITION_KEY = "hpo:definition"
HISTORY_KEY = "hpo:history"
METRICS_KEY = "hpo:metrics"
EPOCH_SECONDS_KEY = "hpo:epoch_seconds"
LEGACY_METRICS_ATTR = "metrics"
SUMMARY_ATTR = "last_epoch"
# Short enough for one line of `optuna trials` and the dashboard's attribute table.
SUMMARY_MAX_CHARS = 200
# The study system attributes hpo writes (their legacy twins are user attributes of the same key).
_STUDY_KEYS = (DEFINITION_KEY, HISTORY_KEY)


# --------------------------------------------------------------------------- study records


def _study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    return _optuna.study_storage(study).get_study_system_attrs(_optuna.study_id(study))


def definition_from_attrs(
    user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The stored definition among a study's attributes (the system one first, then the legacy one)."""
    for attrs in (system_attrs, user_attrs):
        definition = attrs.get(DEFINITION_KEY)
        if isinstance(definition, dict):
            return definition
    return None


def study_definition(study: optuna.Study) -> dict[str, Any] | None:
    """The study's stored definition, or None for a study hpo did not define."""
    return definition_from_attrs(study.user_attrs, _study_system_attrs(study))


def history_from_attrs(
    user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
) -> list[dict[str, Any]]:
    for attrs in (system_attrs, user_attrs):
        records = attrs.get(HISTORY_KEY)
        if isinstance(records, list):
            return [r for r in records if isinstance(r, dict)]
    return []


def study_history(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's lifecycle records (extend, enqueue), oldest first."""
    return history_from_attrs(study.user_attrs, _study_system_attrs(study))


def write_study_records(
    storage: BaseStorage,
    study_id: int,
    records: Mapping[str, Any],
    extra_system: Mapping[str, Any] | None = None,
) -> None:
    """Store ``records`` (keys among ``hpo:definition``, ``hpo:history``) as study system
    attributes, deleting their legacy user attributes, plus ``extra_system`` system attributes
    (e.g. the dashboard note's), in one transaction on a database.

    Without a database (in memory, gRPC) they are written one by one and a legacy user
    attribute is left in place (readers prefer the system one).
    """
    unknown = set(records) - set(_STUDY_KEYS)
    if unknown:
        raise ValueError(f"not an hpo study record: {sorted(unknown)}")
    system = {**records, **(extra_system or {})}
    if _optuna.rdb_backend(storage) is None:
        for key, value in system.items():
            storage.set_study_system_attr(study_id, key, value)
        return
    user_table = _optuna.rdb_models.StudyUserAttributeModel.__table__
    with _optuna.rdb_session(storage) as session:
        upsert_study_system_attrs(session, study_id, system)
        session.execute(
            sqlalchemy.delete(user_table).where(
                user_table.c.study_id == study_id, user_table.c.key.in_(list(records))
            )
        )


def upsert_study_system_attrs(
    session: sqlalchemy.orm.Session, study_id: int, attrs: Mapping[str, Any]
) -> None:
    """Set study system attributes within ``session`` (a transaction of :func:`hpo._optuna.rdb_session`)."""
    table = _optuna.rdb_models.StudySystemAttributeModel.__table__
    for key, value in attrs.items():
        session.execute(sqlalchemy.delete(table).where(table.c.study_id == study_id, table.c.key == key))
        session.execute(
            sqlalchemy.insert(table).values(study_id=study_id, key=key, value_json=json.dumps(value))
        )


# --------------------------------------------------------------------------- trial records


def _list_of_floats(value: Any) -> list[float] | None:
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return [float(v) for v in value]
    return None


def metrics_from_attrs(
    user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any]
) -> dict[str, list[float]]:
    """A trial's metric history, metric -> values from epoch 1 on (empty when none was stored)."""
    for attrs, key in ((system_attrs, METRICS_KEY), (user_attrs, LEGACY_METRICS_ATTR)):
        raw = attrs.get(key)
        if isinstance(raw, dict):
            history = {str(name): _list_of_floats(values) for name, values in raw.items()}
            return {name: values for name, values in history.items() if values is not None}
    return {}


def trial_metrics(trial: FrozenTrial) -> dict[str, list[float]]:
    """The metric history the objective stored with ``trial`` (every metric, each epoch)."""
    return metrics_from_attrs(trial.user_attrs, trial.system_attrs)


def trial_epoch_seconds(trial: FrozenTrial) -> list[float]:
    """Each epoch's duration, as ``hpo compare``'s tabulation recorded it (empty when not timed)."""
    for attrs in (trial.system_attrs, trial.user_attrs):
        seconds = _list_of_floats(attrs.get(EPOCH_SECONDS_KEY))
        if seconds is not None:
            return seconds
    return []


def trial_curves(trial: FrozenTrial, study_metric: str) -> dict[str, dict[int, float]]:
    """Every learning curve of a trial, metric -> {epoch: value} (epochs 1-based).

    The metric history holds each metric's values from epoch 1 on; the study metric comes from the
    trial's intermediate values (what the pruner saw, keyed by epoch), which the worker writes
    every epoch even when the history was last flushed earlier.
    """
    curves = {name: dict(enumerate(values, start=1)) for name, values in trial_metrics(trial).items()}
    if trial.intermediate_values:
        curve = curves.setdefault(study_metric, {})
        curve.update({int(step): value for step, value in trial.intermediate_values.items()})
    return curves


def _round(value: float) -> float:
    return float(f"{value:.4g}") if math.isfinite(value) else value


def metrics_summary(history: Mapping[str, list[float]], study_metric: str) -> dict[str, Any]:
    """The last epoch's metrics, rounded to 4 significant digits, the study's metric first; metrics
    are dropped from the end until its JSON fits in :data:`SUMMARY_MAX_CHARS` characters."""
    epochs = max((len(v) for v in history.values()), default=0)
    names = sorted(n for n in history if history[n])
    if study_metric in names:
        names.remove(study_metric)
        names.insert(0, study_metric)
    summary: dict[str, Any] = {"epoch": epochs}
    for name in names:
        summary[name] = _round(history[name][-1])
    while len(json.dumps(summary)) > SUMMARY_MAX_CHARS and len(summary) > 1:
        summary.popitem()
    return summary


def set_trial_system_attr(trial: Any, key: str, value: Any) -> None:
    """Set a system attribute of a running trial: an ``optuna.Trial`` (in-process training) writes
    it to its storage; a worker's trainer (:class:`hpo.trainer.RemoteTrial`) sends it to the
    worker, which writes it."""
    if isinstance(trial, optuna.Trial):
        storage = _optuna.study_storage(trial.study)
        storage.set_trial_system_attr(_optuna.trial_id(trial), key, value)
        return
    trial.set_system_attr(key, value)


def write_trial_metrics(trial: Any, history: Mapping[str, list[float]], study_metric: str) -> None:
    """Store a running trial's metric history (system attribute) and its short summary (user
    attribute ``last_epoch``)."""
    set_trial_system_attr(trial, METRICS_KEY, {name: list(values) for name, values in history.items()})
    trial.set_user_attr(SUMMARY_ATTR, metrics_summary(history, study_metric))
