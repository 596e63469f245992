"""Replay tables: learning curves recorded once, replayed by every sampler and pruner.

A table (JSON, written by ``hpo tabulate``) holds, for each configuration of a grid, the per-epoch
metrics and per-epoch seconds of one full training run (pruning and early stopping off)::

    {"format": "hpo-replay-table/1", "study": ..., "definition": {...}, "metric": "val_loss",
     "direction": "minimize", "max_epochs": 20,
     "entries": [{"params": {"lr": 0.001, "batch_size": 16}, "state": "COMPLETE",
                  "metrics": {"val_loss": [...], "val_acc": [...]}, "epoch_seconds": [...],
                  "fail_reason": null}, ...]}

:data:`REPLAY_OBJECTIVE` trains nothing: it finds the tabulated configuration nearest to the
trial's parameters (in the space normalised to [0, 1], log scales respected, a categorical mismatch
counting as distance 1) and reports its curve epoch by epoch through ``run.report``, so pruners and
early stopping act exactly as in a real run. A tabulated failure is replayed as a failure. The
seconds the epochs took are recorded (trial user attribute ``hpo:replay_seconds``) for the
simulated clock. Replayed curves carry no training noise: each configuration has one curve.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from hpo.compare._paths import shown
from hpo.compare._results import REPLAY_SECONDS_ATTR, REPLAYED_PARAMS_ATTR
from hpo.errors import HpoError, SpecError
from hpo.objective import Objective, TrialRun
from hpo.space import CategoricalParam, Param, SearchSpace, parse_space
from hpo.spec import StudySpec

TABLE_FORMAT = "hpo-replay-table/1"
# Where the replay objective is imported from (stored in replayed studies' definitions, so any
# `hpo worker --study-name NAME/SAMPLER/seed-K` can run a replayed study).
REPLAY_OBJECTIVE_PATH = "hpo.compare:REPLAY_OBJECTIVE"
# Problem fields that must be the same in the table and in the study it replays.
_SAME_PROBLEM = ("objective", "settings", "data")


@dataclass(frozen=True)
class TableEntry:
    params: Mapping[str, Any]
    state: str  # COMPLETE or FAIL
    metrics: Mapping[str, tuple[float, ...]]
    epoch_seconds: tuple[float, ...]
    fail_reason: str | None = None

    @property
    def epochs(self) -> int:
        return len(self.epoch_seconds)


@dataclass(frozen=True)
class ReplayTable:
    """A loaded, validated table; ``space`` is the tabulated study's space (for normalising)."""

    study: str
    definition: Mapping[str, Any]
    metric: str
    direction: str
    max_epochs: int
    entries: tuple[TableEntry, ...]
    space: SearchSpace

    def to_json(self) -> str:
        data = {
            "format": TABLE_FORMAT,
            "study": self.study,
            "definition": self.definition,
            "metric": self.metric,
            "direction": self.direction,
            "max_epochs": self.max_epochs,
            "entries": [
                {
                    "params": dict(e.params),
                    "state": e.state,
                    "metrics": {k: list(v) for k, v in e.metrics.items()},
                    "epoch_seconds": list(e.epoch_seconds),
                    "fail_reason": e.fail_reason,
                }
                for e in self.entries
            ],
        }
        return json.dumps(data, indent=1, allow_nan=False)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")

    def nearest(self, params: Mapping[str, Any]) -> TableEntry:
        """The entry nearest to ``params`` (the first one on ties, so lookups are deterministic)."""
        return min(self.entries, key=lambda e: distance(self.space, params, e.params))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- distance


def normalise(param: Param, value: Any) -> float | None:
    """``value`` of a numeric parameter mapped to [0, 1] (log scale for log parameters)."""
    if isinstance(param, CategoricalParam):
        return None
    low, high, x = float(param.low), float(param.high), float(value)
    if param.log:
        low, high, x = math.log(low), math.log(high), math.log(max(x, 1e-300))
    return 0.0 if high == low else (x - low) / (high - low)


def distance(space: SearchSpace, a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Squared distance of two configurations in the normalised space.

    A parameter present in one configuration only (inactive in the other) counts 1, as does a
    categorical mismatch; parameters outside ``space`` must match exactly or count 1.
    """
    total = 0.0
    for name in set(a) | set(b):
        if name not in a or name not in b:
            total += 1.0
            continue
        try:
            param = space[name]
        except KeyError:
            total += 0.0 if a[name] == b[name] else 1.0
            continue
        na, nb = normalise(param, a[name]), normalise(param, b[name])
        if na is None or nb is None:
            total += 0.0 if a[name] == b[name] else 1.0
        else:
            total += (na - nb) ** 2
    return total


# --------------------------------------------------------------------------- loading


def _number_list(source: str, where: str, raw: Any) -> tuple[float, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in raw
    ):
        raise SpecError(source, where, "must be a list of finite numbers")
    return tuple(float(v) for v in raw)


def _entry(source: str, i: int, raw: Any, metric: str) -> TableEntry:
    where = f"entries[{i}]"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("params"), Mapping):
        raise SpecError(source, where, "must be a mapping with params, state, metrics, epoch_seconds")
    state = raw.get("state")
    if state not in ("COMPLETE", "FAIL"):
        raise SpecError(source, f"{where}.state", f"must be COMPLETE or FAIL, got {state!r}")
    metrics_raw = raw.get("metrics")
    if not isinstance(metrics_raw, Mapping):
        raise SpecError(source, f"{where}.metrics", "must map metric names to per-epoch values")
    metrics = {str(k): _number_list(source, f"{where}.metrics.{k}", v) for k, v in metrics_raw.items()}
    seconds = _number_list(source, f"{where}.epoch_seconds", raw.get("epoch_seconds"))
    for name, values in metrics.items():
        if len(values) != len(seconds):
            raise SpecError(
                source,
                f"{where}.metrics.{name}",
                f"has {len(values)} epochs but epoch_seconds has {len(seconds)}",
            )
    if state == "COMPLETE" and (metric not in metrics or not seconds):
        raise SpecError(source, f"{where}.metrics", f"a COMPLETE entry needs a {metric!r} curve")
    return TableEntry(dict(raw["params"]), state, metrics, seconds, raw.get("fail_reason"))


def load_table(path: str | Path) -> ReplayTable:
    """Read and validate a replay table; one clear error naming the file and field otherwise."""
    path = Path(path)
    source = str(path)
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long, for one
        raise SpecError(
            shown(source), "", f"cannot read the replay table: {exc.strerror}", "name the table file"
        ) from None
    if not found:
        what = "is a folder, not a replay table" if path.is_dir() else "replay table not found"
        raise SpecError(source, "", what, "write one with `hpo tabulate STUDY_FILE`")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(
            source, "", f"is not a JSON replay table ({exc})", "write one with hpo tabulate"
        ) from None
    if not isinstance(raw, Mapping) or raw.get("format") != TABLE_FORMAT:
        raise SpecError(source, "format", f"must be {TABLE_FORMAT!r}", "write the table with `hpo tabulate`")
    for key in ("study", "definition", "metric", "direction", "max_epochs", "entries"):
        if key not in raw:
            raise SpecError(source, key, "is required")
    definition = raw["definition"]
    if not isinstance(definition, Mapping) or not isinstance(definition.get("search_space"), Mapping):
        raise SpecError(source, "definition.search_space", "must hold the tabulated study's search space")
    space = parse_space(definition["search_space"], f"{source}: definition.search_space")
    entries_raw = raw["entries"]
    if not isinstance(entries_raw, list) or not entries_raw:
        raise SpecError(source, "entries", "must be a non-empty list")
    entries = tuple(_entry(source, i, e, str(raw["metric"])) for i, e in enumerate(entries_raw))
    if not any(e.state == "COMPLETE" for e in entries):
        raise SpecError(source, "entries", "holds no completed configuration")
    return ReplayTable(
        study=str(raw["study"]),
        definition=dict(definition),
        metric=str(raw["metric"]),
        direction=str(raw["direction"]),
        max_epochs=int(raw["max_epochs"]),
        entries=entries,
        space=space,
    )


# --------------------------------------------------------------------------- coverage


def check_covers(table: ReplayTable, spec: StudySpec, source: str) -> None:
    """Raise :class:`SpecError` (naming ``source``, the table) unless ``table`` can replay ``spec``:
    same problem (objective, settings, data), metric and direction, enough epochs, the same
    parameters, every numeric range spanned and every categorical choice tabulated."""
    definition = spec.definition()
    for key in _SAME_PROBLEM:
        if table.definition.get(key) != definition.get(key):
            raise SpecError(
                source,
                f"definition.{key}",
                f"the table was recorded with {key} {table.definition.get(key)!r} but the study has "
                f"{definition.get(key)!r}",
                "tabulate this study file (with the same --subset), or use its table",
            )
    if table.direction != spec.direction:
        raise SpecError(source, "direction", f"is {table.direction} but the study says {spec.direction}")
    completed = [e for e in table.entries if e.state == "COMPLETE"]
    if not any(spec.metric in e.metrics for e in completed):
        raise SpecError(source, "metric", f"the table has no {spec.metric!r} curves", "tabulate this study")
    if table.max_epochs < spec.budget.max_epochs:
        raise SpecError(
            source,
            "max_epochs",
            f"curves have {table.max_epochs} epochs but the study trains up to {spec.budget.max_epochs}",
            f"tabulate with budget.max_epochs >= {spec.budget.max_epochs}",
        )
    table_names, study_names = set(table.space.names), set(spec.space.names)
    if table_names != study_names:
        raise SpecError(
            source,
            "definition.search_space",
            f"tabulates parameters {sorted(table_names)} but the study searches {sorted(study_names)}",
            "tabulate this study file",
        )
    for param in spec.space:
        values = [e.params[param.name] for e in table.entries if param.name in e.params]
        if isinstance(param, CategoricalParam):
            missing = [c for c in param.choices if c not in values]
            if missing:
                raise SpecError(
                    source,
                    "entries",
                    f"does not cover the study's search space: {param.name} choices {missing} "
                    "were never tabulated",
                    "tabulate a grid that includes every choice",
                )
            continue
        numbers = [float(v) for v in values]
        low, high = (min(numbers), max(numbers)) if numbers else (math.inf, -math.inf)
        tolerance = 1e-9 * max(abs(param.low), abs(param.high), 1.0)
        if low > param.low + tolerance or high < param.high - tolerance:
            raise SpecError(
                source,
                "entries",
                f"does not cover the study's search space: {param.name} spans "
                f"[{param.low:g}, {param.high:g}] in the study but [{low:g}, {high:g}] in the table",
                "tabulate a grid spanning the whole range (hpo tabulate STUDY_FILE --points-per-param 7), "
                "or narrow the study's range",
            )


# --------------------------------------------------------------------------- the objective


class ReplayData(BaseModel):
    """The ``data:`` of a replayed study: the table and its digest (the table must not change)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str
    sha256: str


def _cached_table(run: TrialRun) -> ReplayTable:
    data = ReplayData(**run.data)
    key = f"replay-table:{data.table}:{data.sha256}"
    if key not in run.cache:
        path = Path(data.table)
        if not path.is_file() or file_digest(path) != data.sha256:
            raise HpoError(
                f"replay table {data.table} is missing or changed since the comparison was created "
                "(fix: restore it, or start a new comparison with --name)"
            )
        run.cache[key] = load_table(path)
    table = run.cache[key]
    assert isinstance(table, ReplayTable)
    return table


def _replay(run: TrialRun) -> float:
    table = _cached_table(run)
    entry = table.nearest(run.params)
    run.trial.set_user_attr(REPLAYED_PARAMS_ATTR, dict(entry.params))
    seconds = 0.0
    try:
        for epoch in range(1, min(run.max_epochs, entry.epochs) + 1):
            seconds += entry.epoch_seconds[epoch - 1]
            metrics = {name: values[epoch - 1] for name, values in entry.metrics.items()}
            if run.report(epoch, metrics):
                break
        if entry.state == "FAIL":
            raise RuntimeError(f"replayed failure of the tabulated configuration: {entry.fail_reason}")
    finally:
        # Written once (also when pruned): the seconds these epochs took when they were tabulated.
        run.trial.set_user_attr(REPLAY_SECONDS_ATTR, seconds)
    return run.final_value()


REPLAY_OBJECTIVE = Objective(
    train=_replay,
    data=ReplayData,
    description="replays learning curves from a table written by hpo tabulate (no training)",
)
