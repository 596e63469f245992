"""What a comparison produced, as plain data: one record per (sampler, seed) run and per trial.

Everything the report shows is computed from :class:`ComparisonResults`, which is read from the
studies in a storage (:func:`collect_results`) or from the ``results.json`` a report writes, so a
report can be redrawn without the database (and an in-memory replay leaves only that file).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from hpo.compare._paths import shown
from hpo.errors import HpoError, SpecError
from hpo.studies import load_study_spec

RESULTS_FORMAT = "hpo-comparison-results/1"
# Study user attribute that marks a study as one run of a comparison.
COMPARISON_ATTR = "hpo:comparison"
# Trial user attribute: simulated seconds a replayed trial would have trained.
REPLAY_SECONDS_ATTR = "hpo:replay_seconds"
# Trial user attribute: the tabulated configuration a replayed trial looked up and replayed.
REPLAYED_PARAMS_ATTR = "hpo:replayed_params"
_RUN_NAME = re.compile(r"^(?P<sampler>[A-Za-z0-9_.\-]+)/seed-(?P<seed>\d+)$")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass(frozen=True)
class TrialResult:
    """One trial. ``finished_at``: seconds of the run's active time when it finished (None: unfinished).

    ``value`` is the trial's value only for COMPLETE trials (pruned and failed trials never count as
    a best). ``seconds`` is device time spent on the trial, simulated for replayed trials.
    ``table_params``: for a replayed trial, the tabulated configuration nearest to ``params`` whose
    curve was replayed (what was evaluated); None for trained trials.
    """

    number: int
    state: str
    value: float | None
    params: Mapping[str, Any]
    epochs: int
    seconds: float
    finished_at: float | None
    table_params: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RunResult:
    """The trials of one (sampler, seed) study, ``n_trials`` of them planned."""

    sampler: str
    seed: int
    study_name: str
    n_trials: int
    trials: tuple[TrialResult, ...]

    @property
    def finished(self) -> tuple[TrialResult, ...]:
        """Finished trials in the order they finished."""
        done = [t for t in self.trials if t.state in FINISHED and t.finished_at is not None]
        return tuple(sorted(done, key=lambda t: (t.finished_at, t.number)))

    @property
    def is_complete(self) -> bool:
        """True once no planned trial is waiting or running."""
        return all(t.state in FINISHED for t in self.trials) and len(self.trials) >= self.n_trials


@dataclass(frozen=True)
class ComparisonResults:
    """Every run of one comparison plus what is needed to read them (metric, direction, space)."""

    name: str
    metric: str
    direction: str
    n_trials: int
    max_epochs: int
    space: Mapping[str, Any]
    samplers: tuple[str, ...]
    runs: tuple[RunResult, ...]
    replay_table: str | None = None

    def runs_of(self, sampler: str) -> tuple[RunResult, ...]:
        return tuple(sorted((r for r in self.runs if r.sampler == sampler), key=lambda r: r.seed))

    def to_json(self) -> str:
        data = {"format": RESULTS_FORMAT, **asdict(self)}
        return json.dumps(data, indent=1, allow_nan=False)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")


def load_results(path: str | Path) -> ComparisonResults:
    """Read a ``results.json`` written by a report; one clear error if it is not one."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HpoError(f"{path}: cannot read comparison results ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != RESULTS_FORMAT:
        raise SpecError(
            str(path), "format", f"is not {RESULTS_FORMAT!r}", "pass a results.json that hpo wrote"
        )
    try:
        runs = tuple(
            RunResult(
                sampler=str(r["sampler"]),
                seed=int(r["seed"]),
                study_name=str(r["study_name"]),
                n_trials=int(r["n_trials"]),
                trials=tuple(TrialResult(**t) for t in r["trials"]),
            )
            for r in raw["runs"]
        )
        return ComparisonResults(
            name=str(raw["name"]),
            metric=str(raw["metric"]),
            direction=str(raw["direction"]),
            n_trials=int(raw["n_trials"]),
            max_epochs=int(raw["max_epochs"]),
            space=dict(raw["space"]),
            samplers=tuple(raw["samplers"]),
            runs=runs,
            replay_table=raw.get("replay_table"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(str(path), "", f"malformed comparison results ({exc!r})") from None


# --------------------------------------------------------------------------- time


def active_elapsed(intervals: Sequence[tuple[float, float]], at: float) -> float:
    """Seconds up to ``at`` during which at least one of ``intervals`` was running.

    A run's clock is its *active* time (the union of its trials' intervals), so a comparison that
    was stopped overnight and resumed is not charged for the night.
    """
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(max(0.0, min(end, at) - start) for start, end in merged if start < at)


def simulated_intervals(seconds: Sequence[float], workers: int = 1) -> list[tuple[float, float]]:
    """The simulated clock of a replay: trials (in trial order) start on the first free worker."""
    free = [0.0] * max(1, workers)
    out = []
    for duration in seconds:
        slot = min(range(len(free)), key=free.__getitem__)
        start = free[slot]
        free[slot] = start + duration
        out.append((start, start + duration))
    return out


# --------------------------------------------------------------------------- collecting


def _epochs(trial: FrozenTrial) -> int:
    """Epochs the trial actually trained: those it took over from a checkpoint (a BOHB promotion
    continuing its parent, a retry resuming its attempt) were counted where they were trained."""
    return len(trial.intermediate_values) - int(trial.user_attrs.get("resumed_from_epoch", 0))


def _real_seconds(trial: FrozenTrial) -> float:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return 0.0


def _run_result(sampler: str, seed: int, study: optuna.Study, n_trials: int) -> RunResult:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    finished = [t for t in trials if t.state.is_finished()]
    replayed = any(REPLAY_SECONDS_ATTR in t.user_attrs for t in finished)
    if replayed:
        seconds = {t.number: float(t.user_attrs.get(REPLAY_SECONDS_ATTR, 0.0)) for t in finished}
        spans = dict(zip(seconds, simulated_intervals(list(seconds.values())), strict=True))
    else:
        seconds = {t.number: _real_seconds(t) for t in finished}
        origin = min((t.datetime_start for t in finished if t.datetime_start), default=None)
        spans = {
            t.number: (
                (t.datetime_start - origin).total_seconds(),
                (t.datetime_complete - origin).total_seconds(),
            )
            for t in finished
            if origin is not None and t.datetime_start and t.datetime_complete
        }
    intervals = list(spans.values())
    records = []
    for t in trials:
        value = t.value if t.state == TrialState.COMPLETE and t.value is not None else None
        span = spans.get(t.number)
        looked_up = t.user_attrs.get(REPLAYED_PARAMS_ATTR)
        records.append(
            TrialResult(
                number=t.number,
                state=t.state.name,
                value=float(value) if value is not None and math.isfinite(value) else None,
                params=dict(t.params),
                epochs=_epochs(t),
                seconds=seconds.get(t.number, 0.0),
                finished_at=active_elapsed(intervals, span[1]) if span is not None else None,
                table_params=dict(looked_up) if isinstance(looked_up, Mapping) else None,
            )
        )
    return RunResult(sampler, seed, study.study_name, n_trials, tuple(records))


def comparison_study_names(storage: BaseStorage, name: str) -> list[tuple[str, int, str]]:
    """``(sampler, seed, study name)`` of every study named ``NAME/SAMPLER/seed-K``."""
    found = []
    prefix = f"{name}/"
    for study_name in optuna.get_all_study_names(storage):
        if not study_name.startswith(prefix):
            continue
        match = _RUN_NAME.match(study_name[len(prefix) :])
        if match:
            found.append((match["sampler"], int(match["seed"]), study_name))
    return sorted(found, key=lambda item: (item[0], item[1]))


def collect_results(
    storage: BaseStorage, name: str, samplers: Sequence[str] | None = None
) -> ComparisonResults:
    """Read every run of comparison ``name`` (studies ``NAME/SAMPLER/seed-K``) from ``storage``.

    ``samplers`` fixes the order of algorithms (others found in the storage follow, sorted).
    """
    found = comparison_study_names(storage, name)
    if not found:
        raise HpoError(
            f"no comparison named {shown(repr(name))} in this storage: no study is named "
            f"{shown(name)}/SAMPLER/seed-K "
            "(fix: check the name and --storage, or run `hpo compare STUDY_FILE` first)"
        )
    runs = []
    spec = None
    for sampler, seed, study_name in found:
        study, run_spec = load_study_spec(storage, study_name)
        spec = spec or run_spec
        runs.append(_run_result(sampler, seed, study, run_spec.n_trials))
    assert spec is not None  # found is not empty
    order = list(dict.fromkeys([*(samplers or ()), *sorted({r.sampler for r in runs})]))
    present = {r.sampler for r in runs}
    table = spec.data.get("table") if spec.objective.startswith("hpo.compare") else None
    definition = spec.definition()
    return ComparisonResults(
        name=name,
        metric=spec.metric,
        direction=spec.direction,
        n_trials=spec.n_trials,
        max_epochs=spec.budget.max_epochs,
        space=definition["search_space"],
        samplers=tuple(s for s in order if s in present),
        runs=tuple(runs),
        replay_table=str(table) if table else None,
    )
