"""What hpo writes for optuna-dashboard to show: the study note and the metric-curve figures.

* **The study note** (the "Note" card of the study's page): the study definition as YAML, and the
  lifecycle history (extensions, enqueued configurations). Written when the study is created
  (``create-study``, a worker's first adoption, ``--replace``) and rewritten when ``hpo extend``
  or ``hpo retrain`` changes the definition; text typed into the note in the dashboard is
  replaced then.
* **One figure per metric** (on the study's page, beside Optuna's plots): every finished trial's
  curve of that metric by epoch, one line per trial. The worker rewrites them after each trial it
  finishes (at most every few seconds, and when it stops: :class:`CurvePublisher`); a failure to
  write them is reported once and never fails a trial.

Both are optuna-dashboard's own study system attributes, in the format its ``save_note`` and
``save_plotly_graph_object`` write (``dashboard:note_ver``, ``dashboard:note_str:<i>``,
``dashboard:plot_data:<id>:<i>``, values cut in chunks of 2045 characters). hpo writes that
format itself rather than calling them: importing optuna_dashboard takes about 2 s and
``save_plotly_graph_object`` wants a plotly ``Figure`` (plotly is another second, and its default
template adds kilobytes to every figure), a cost ``create-study`` and every worker would pay; it
also writes chunk by chunk, where hpo writes a figure in one transaction. ``tests/test_dashboard_data.py``
reads what hpo writes back with optuna_dashboard's own ``get_note`` and
``get_plotly_graph_objects``, so a release that changes the format fails there.

Computing a figure's data (:func:`curve_data`, pure) is kept apart from drawing it
(:func:`figure`) and from storing it (:func:`publish_curves`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy
import yaml
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpo import _optuna
from hpo._records import (
    DEFINITION_KEY,
    HISTORY_KEY,
    definition_from_attrs,
    history_from_attrs,
    trial_curves,
    upsert_study_system_attrs,
    write_study_records,
)

NOTE_VER_KEY = "dashboard:note_ver"
NOTE_STR_PREFIX = "dashboard:note_str:"
PLOT_PREFIX = "dashboard:plot_data:"
CHUNK_CHARS = 2045  # optuna_dashboard's SYSTEM_ATTR_MAX_LENGTH
FIGURE_ID_PREFIX = "hpo-curves-"
# A figure keeps at most this many trials' curves (the best half and the latest half): it is
# rewritten after every trial, so its size must not grow with the study without bound.
MAX_CURVES = 100
# A worker rewrites the figures at most this often (and when it stops): see CurvePublisher.
PUBLISH_INTERVAL_S = 5.0
# History records shown in the note (the latest); the full history stays in `hpo:history`.
NOTE_HISTORY = 20
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _chunks(text: str, prefix: str) -> dict[str, str]:
    return {
        f"{prefix}{i}": text[start : start + CHUNK_CHARS]
        for i, start in enumerate(range(0, len(text), CHUNK_CHARS))
    }


def _replace_chunks(text: str, prefix: str, current: Mapping[str, Any]) -> dict[str, str]:
    """The attributes storing ``text`` under ``prefix``; chunks of a longer previous value are blanked,
    as optuna_dashboard does (it joins every key of the prefix)."""
    chunks = _chunks(text, prefix)
    stale = sum(1 for key in current if key.startswith(prefix))
    for i in range(len(chunks), stale):
        chunks[f"{prefix}{i}"] = ""
    return chunks


# --------------------------------------------------------------------------- the note


def definition_note(
    study_name: str, definition: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = ()
) -> str:
    """The study note (Markdown): the stored definition as a fenced YAML block, then the latest
    lifecycle records."""
    body = yaml.safe_dump(dict(definition), sort_keys=False, allow_unicode=True, width=100).rstrip()
    lines = [
        f"## Study definition of {study_name}",
        "",
        "Stored by hpo with the study; `hpo status`, `hpo export` and the workers read it from the storage. "
        "This note is rewritten when the definition changes (`hpo extend`, `create-study --replace`).",
        "",
        "```yaml",
        body,
        "```",
    ]
    if history:
        lines += ["", "### History", ""]
        shown = list(history)[-NOTE_HISTORY:]
        if len(history) > len(shown):
            lines.append(f"- ({len(history) - len(shown)} earlier records not shown)")
        for record in shown:
            details = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("action", "at"))
            lines.append(f"- {record.get('at', '?')}: {record.get('action', '?')} {details}".rstrip())
    return "\n".join(lines) + "\n"


def note_attrs(body: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """The study system attributes that make ``body`` the study's note, given its ``current`` system
    attributes (the version goes up by one, so an edit open in a browser is not silently lost)."""
    version = current.get(NOTE_VER_KEY, 0)
    return {
        NOTE_VER_KEY: (version if isinstance(version, int) else 0) + 1,
        **_replace_chunks(body, NOTE_STR_PREFIX, current),
    }


def store_records(
    storage: BaseStorage,
    study_id: int,
    study_name: str,
    *,
    definition: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Store the study's definition and/or history (:func:`hpo._records.write_study_records`) and
    rewrite its note from the result, in one transaction on a database."""
    current = storage.get_study_system_attrs(study_id)
    user = storage.get_study_user_attrs(study_id)
    records: dict[str, Any] = {}
    if definition is not None:
        records[DEFINITION_KEY] = dict(definition)
    if history is not None:
        records[HISTORY_KEY] = [dict(r) for r in history]
    shown_definition = records.get(DEFINITION_KEY) or definition_from_attrs(user, current) or {}
    shown_history = records.get(HISTORY_KEY, history_from_attrs(user, current))
    note = note_attrs(definition_note(study_name, shown_definition, shown_history), current)
    write_study_records(storage, study_id, records, note)


# --------------------------------------------------------------------------- the curves


@dataclass(frozen=True)
class Curve:
    """One trial's curve of one metric."""

    number: int
    state: str
    epochs: tuple[int, ...]
    values: tuple[float, ...]


def _chosen(trials: Sequence[FrozenTrial], direction: str, limit: int) -> list[FrozenTrial]:
    """At most ``limit`` trials: the best half (complete ones, by value) and the latest ones."""
    if len(trials) <= limit:
        return list(trials)
    # (By the first objective's value: a multi-objective trial has several.)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    sign = 1.0 if direction == "minimize" else -1.0
    complete.sort(key=lambda t: sign * float(t.values[0]))
    keep = {t.number for t in complete[: limit // 2]}
    for t in sorted(trials, key=lambda t: t.number, reverse=True):
        if len(keep) >= limit:
            break
        keep.add(t.number)
    return [t for t in trials if t.number in keep]


def curve_data(
    trials: Sequence[FrozenTrial], study_metric: str, direction: str = "minimize", limit: int = MAX_CURVES
) -> dict[str, list[Curve]]:
    """Each metric's curves over the finished trials (at most ``limit``, see :data:`MAX_CURVES`),
    by trial number; the study's metric first, then the others by name. Non-finite values are left
    out (JSON has no NaN)."""
    finished = sorted((t for t in trials if t.state in _FINISHED), key=lambda t: t.number)
    by_metric: dict[str, list[Curve]] = {}
    for trial in _chosen(finished, direction, limit):
        for name, curve in trial_curves(trial, study_metric).items():
            points = [(e, float(v)) for e, v in sorted(curve.items()) if math.isfinite(float(v))]
            if points:
                epochs, values = zip(*points, strict=True)
                by_metric.setdefault(name, []).append(Curve(trial.number, trial.state.name, epochs, values))
    order = sorted(by_metric, key=lambda name: (name != study_metric, name))
    return {name: by_metric[name] for name in order}


def figure(metric: str, curves: Sequence[Curve]) -> dict[str, Any]:
    """A plotly figure (as JSON-ready data) of ``curves``: one line per trial, epochs on x."""
    data = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": f"trial #{c.number}",
            "x": list(c.epochs),
            "y": [float(f"{v:.6g}") for v in c.values],
            "hovertemplate": f"trial #{c.number} ({c.state.lower()})<br>epoch %{{x}}: %{{y}}<extra></extra>",
            "marker": {"size": 4},
        }
        for c in curves
    ]
    layout = {
        "title": {"text": f"{metric} by epoch (hpo, one line per trial)"},
        "xaxis": {"title": {"text": "epoch"}},
        "yaxis": {"title": {"text": metric}},
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        "showlegend": len(curves) <= 20,
    }
    return {"data": data, "layout": layout}


def figure_id(metric: str) -> str:
    """The graph object id of ``metric``'s figure: letters, digits, ``-``, ``_`` and ``.`` only, as
    the dashboard requires; a metric name with other characters gets a short hash to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", metric)
    if safe != metric:
        safe += "-" + hashlib.sha256(metric.encode()).hexdigest()[:6]
    return FIGURE_ID_PREFIX + safe


def figure_attrs(figures: Mapping[str, Mapping[str, Any]], current: Mapping[str, Any]) -> dict[str, str]:
    """The study system attributes storing ``figures`` (metric -> plotly figure)."""
    attrs: dict[str, str] = {}
    for metric, fig in figures.items():
        text = json.dumps(fig, separators=(",", ":"), allow_nan=False)
        attrs.update(_replace_chunks(text, f"{PLOT_PREFIX}{figure_id(metric)}:", current))
    return attrs


def _curve_attrs(storage: BaseStorage, study_id: int, study_metric: str, direction: str) -> dict[str, str]:
    trials = storage.get_all_trials(study_id, deepcopy=False, states=_FINISHED)
    figures = {
        metric: figure(metric, curves)
        for metric, curves in curve_data(trials, study_metric, direction).items()
    }
    return figure_attrs(figures, storage.get_study_system_attrs(study_id))


def publish_curves(
    storage: BaseStorage, study_id: int, study_metric: str, direction: str = "minimize"
) -> None:
    """Rewrite the study's metric figures from its finished trials.

    On a database it is one transaction; on PostgreSQL, workers finishing trials at once take
    turns (a transaction-scoped advisory lock taken before the trials are read), so the figure
    written last was computed from every trial finished before it.
    """
    if _optuna.rdb_backend(storage) is None:
        for key, value in _curve_attrs(storage, study_id, study_metric, direction).items():
            storage.set_study_system_attr(study_id, key, value)
        return
    with _optuna.rdb_session(storage) as session:
        if session.get_bind().dialect.name == "postgresql":
            lock = int.from_bytes(
                hashlib.sha256(f"hpo:curves:{study_id}".encode()).digest()[:8], "big", signed=True
            )
            session.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock})
        upsert_study_system_attrs(session, study_id, _curve_attrs(storage, study_id, study_metric, direction))


class CurvePublisher:
    """A worker's :func:`publish_curves`: after a trial ends, at most once per ``min_interval``
    seconds (trivial trials end many times a second; a real one takes longer than that, so each
    shows up at once), and when the worker stops, if a trial ended since the last write.

    A failure is reported once (``say``) and otherwise ignored: the figures are a view, and the
    trial is already recorded.
    """

    def __init__(
        self,
        storage: BaseStorage,
        study_id: int,
        study_metric: str,
        direction: str,
        say: Callable[[str], None],
        min_interval: float = PUBLISH_INTERVAL_S,
    ) -> None:
        self._args = (storage, study_id, study_metric, direction)
        self._say = say
        self._min_interval = min_interval
        self._last = -math.inf
        self._pending = False
        self._warned = False

    def trial_ended(self) -> bool:
        """Rewrite the figures unless they were written less than ``min_interval`` seconds ago;
        whether they were written now."""
        self._pending = True
        if time.monotonic() - self._last < self._min_interval:
            return False
        return self.publish()

    def finish(self) -> bool:
        """Write what :meth:`trial_ended` held back (the worker is stopping)."""
        return self.publish() if self._pending else False

    def publish(self) -> bool:
        self._last = time.monotonic()
        self._pending = False
        try:
            publish_curves(*self._args)
        except Exception as exc:
            if not self._warned:
                self._warned = True
                self._say(
                    f"warning: could not update the dashboard's metric figures ({type(exc).__name__}: {exc})"
                )
            return False
        return True
