"""Reading results back: status tables, the best trial, exports."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from hpo._progress import count_trials, report_console
from hpo._rdb import WORKER_ATTR
from hpo._records import definition_from_attrs, trial_curves, trial_metrics
from hpo.errors import HpoError
from hpo.studies import stored_definition
from hpo.worker import TRACEBACK_ATTR


def load(storage: BaseStorage, study_name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage)) or "none"
        raise HpoError(f"no study named {study_name!r} in this storage (studies there: {names})") from None


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objective names: its metric names (set when hpo creates a study), else
    Optuna's ``values_0``, ``values_1``, ..."""
    names = study.metric_names
    return list(names) if names else [f"values_{i}" for i in range(len(study.directions))]


def best_trial(study: optuna.Study) -> dict[str, Any]:
    """The best trial; for a multi-objective study the Pareto front (``best_trials``), each
    trial with its ``values`` in the order of ``metrics``."""
    if len(study.directions) > 1:
        front = sorted(study.best_trials, key=lambda t: t.number)
        if not front:
            raise HpoError(f"study {study.study_name!r} has no completed trial yet")
        return {
            "study": study.study_name,
            "metrics": objective_names(study),
            "directions": [d.name.lower() for d in study.directions],
            "best_trials": [
                {
                    "number": t.number,
                    "values": t.values,
                    "params": t.params,
                    "epochs_done": len(t.intermediate_values),
                }
                for t in front
            ],
        }
    try:
        best = study.best_trial
    except ValueError:
        raise HpoError(f"study {study.study_name!r} has no completed trial yet") from None
    return {
        "study": study.study_name,
        "number": best.number,
        "value": best.value,
        "params": best.params,
        "direction": study.direction.name.lower(),
        "epochs_done": len(best.intermediate_values),
    }


def best_text(best: dict[str, Any]) -> str:
    """What ``hpo best`` prints for :func:`best_trial`'s answer."""
    if "best_trials" not in best:
        params = "".join(f"\n  {name}: {value}" for name, value in best["params"].items())
        return f"best trial {best['number']}: {best['value']:.6g}{params}"
    objectives = ", ".join(f"{m} ({d})" for m, d in zip(best["metrics"], best["directions"], strict=True))
    lines = [f"Pareto front of {best['study']}: {len(best['best_trials'])} trial(s); {objectives}"]
    for trial in best["best_trials"]:
        values = "  ".join(f"{m}={v:.6g}" for m, v in zip(best["metrics"], trial["values"], strict=True))
        params = ", ".join(f"{k}={v}" for k, v in trial["params"].items())
        lines.append(f"  trial {trial['number']}: {values}  [{params}]")
    return "\n".join(lines)


def _single(values: list[float] | None) -> float | None:
    return values[0] if values is not None and len(values) == 1 else None


def _duration(trial: FrozenTrial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trial_record(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": _single(trial.values),  # None for a multi-objective trial: see "values"
        "values": trial.values,
        "params": trial.params,
        "datetime_start": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "datetime_complete": trial.datetime_complete.isoformat() if trial.datetime_complete else None,
        "duration_s": _duration(trial),
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "metrics": trial_metrics(trial),
        "fail_reason": trial.system_attrs.get("fail_reason"),
        "traceback": trial.system_attrs.get(TRACEBACK_ATTR),  # a failed trial's, as the worker stored it
        "worker": trial.system_attrs.get(WORKER_ATTR),
        "retried_from": trial.system_attrs.get("failed_trial"),
    }


EXPORT_FORMATS = ("csv", "csv-long", "json")
_LONG_FIXED = ("number", "state", "epoch")


def _study_metric(study: optuna.Study) -> str:
    """The name of the metric in the trials' intermediate values: the study file's ``metric:``, or
    Optuna's own ``intermediate_value`` for a study without a stored definition."""
    definition = stored_definition(study) or {}
    metric = definition.get("metric")
    if isinstance(metric, list) and metric:
        metric = metric[0]  # a multi-objective study reports its first metric as intermediate values
    return metric if isinstance(metric, str) and metric else "intermediate_value"


def _metric_names(curves: list[dict[str, dict[int, float]]], study_metric: str) -> list[str]:
    names = sorted({name for c in curves for name in c} - {study_metric})
    if any(study_metric in c for c in curves):
        names.insert(0, study_metric)  # the study's metric first, then the others by name
    return names


def _cell(value: Any) -> Any:
    return "" if value is None else value


def export(study: optuna.Study, fmt: str) -> str:
    """The study's trials as ``json``, ``csv`` or ``csv-long``.

    ``csv`` is one row per trial (number, state, value, times, ``params_NAME`` as in Optuna's
    ``trials_dataframe``, a failed trial's traceback and fail_reason, worker) plus ``curve_METRIC``
    per metric: that trial's
    values by epoch from epoch 1, as a JSON list (``json.loads`` it). ``csv-long`` is tidy: one
    row per trial and epoch (number, state, ``params_NAME``..., epoch, then one column per metric,
    the study's metric first, empty where a metric has no value that epoch); a trial with no epoch
    yet (waiting, or failed before its first report) is one row with epoch empty.
    """
    if fmt not in EXPORT_FORMATS:
        raise HpoError(f"unknown export format {fmt!r} (fix: use one of {', '.join(EXPORT_FORMATS)})")
    trials = study.get_trials(deepcopy=False)
    if fmt == "json":
        records = [trial_record(t) for t in trials]
        return json.dumps({"study": study.study_name, "trials": records}, indent=2, default=str) + "\n"
    study_metric = _study_metric(study)
    curves = [trial_curves(t, study_metric) for t in trials]
    metric_names = _metric_names(curves, study_metric)
    param_names = sorted({name for t in trials for name in t.params})
    param_columns = [f"params_{n}" for n in param_names]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if fmt == "csv-long":
        # A metric named like a fixed column gets a prefix, so every header is unique.
        taken = {*_LONG_FIXED, *param_columns}
        writer.writerow(
            [
                *_LONG_FIXED[:2],
                *param_columns,
                "epoch",
                *[f"metric_{m}" if m in taken else m for m in metric_names],
            ]
        )
        for trial, curve in zip(trials, curves, strict=True):
            head = [trial.number, trial.state.name, *[_cell(trial.params.get(n)) for n in param_names]]
            epochs = sorted({epoch for values in curve.values() for epoch in values})
            if not epochs:
                writer.writerow([*head, "", *["" for _ in metric_names]])
            for epoch in epochs:
                writer.writerow([*head, epoch, *[_cell(curve.get(m, {}).get(epoch)) for m in metric_names]])
        return out.getvalue()
    # A multi-objective study's values, one column each, named like Optuna's trials_dataframe.
    values_columns = (
        [n if n.startswith("values_") else f"values_{n}" for n in objective_names(study)]
        if len(study.directions) > 1
        else []
    )
    columns = [
        "number",
        "state",
        "value",
        *values_columns,
        "duration_s",
        "datetime_start",
        "datetime_complete",
        *param_columns,
        "traceback",
        "fail_reason",
        "worker",
        *[f"curve_{m}" for m in metric_names],
    ]
    writer.writerow(columns)
    for trial, curve in zip(trials, curves, strict=True):
        record = trial_record(trial)
        params = record["params"]
        writer.writerow(
            [
                record["number"],
                record["state"],
                _cell(record["value"]),
                *[
                    _cell(record["values"][i] if record["values"] else None)
                    for i in range(len(values_columns))
                ],
                record["duration_s"],
                record["datetime_start"],
                record["datetime_complete"],
                *[params.get(n, "") for n in param_names],
                record["traceback"] or "",
                record["fail_reason"] or "",
                record["worker"] or "",
                *[
                    json.dumps([v for _, v in sorted(curve[m].items())]) if m in curve else ""
                    for m in metric_names
                ],
            ]
        )
    return out.getvalue()


def print_studies(storage: BaseStorage, console: Console | None = None) -> None:
    console = console or report_console()
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=True)
    # The definition is a study system attribute, which study summaries lack.
    system_attrs = {s.study_name: s.system_attrs for s in storage.get_all_studies()}
    if not summaries:
        console.print("no studies in this storage (create one with `hpo create-study STUDY_FILE`)")
        return
    table = Table(title="studies")
    for column in ("study", "direction", "done/planned", "best value"):
        table.add_column(column, no_wrap=column != "study")
    for s in summaries:
        best = f"{s.best_trial.value:.6g}" if s.best_trial and s.best_trial.value is not None else "-"
        definition = definition_from_attrs(s.user_attrs, system_attrs.get(s.study_name, {}))
        planned = definition.get("n_trials") if isinstance(definition, dict) else None
        trials = storage.get_all_trials(storage.get_study_id_from_name(s.study_name), deepcopy=False)
        counts = count_trials(trials, planned if isinstance(planned, int) else 0, None)
        if len(s.directions) > 1:  # no single best: the size of the Pareto front
            front = optuna.load_study(study_name=s.study_name, storage=storage).best_trials
            best = f"front of {len(front)}" if front else "-"
        directions = ", ".join(d.name.lower() for d in s.directions)
        table.add_row(s.study_name, directions, f"{counts.done}/{counts.planned}", best)
    console.print(table)


def _print_front(study: optuna.Study, console: Console) -> None:
    """A multi-objective study's Pareto front, every value of each of its trials."""
    front = sorted(study.best_trials, key=lambda t: t.number)
    if not front:
        console.print("  Pareto front: no completed trial yet")
        return
    names = objective_names(study)
    console.print(f"  Pareto front: {len(front)} trial(s)")
    for t in front:
        values = "  ".join(f"{n}={v:.6g}" for n, v in zip(names, t.values, strict=True))
        console.print(f"    trial {t.number}: {values} params={t.params}", markup=False)


def print_status(study: optuna.Study, n_trials: int, console: Console | None = None) -> None:
    """``n_trials``: the stored definition's. Counts per planned configuration (a retried
    attempt is ``retried``, not a trial: see :mod:`hpo._progress`); when stdout is not a terminal
    nothing is wrapped, so values are never split across lines."""
    console = console or report_console()
    counts = count_trials(study.get_trials(deepcopy=False), n_trials, None)
    console.print(f"study [bold]{study.study_name}[/bold]: {counts.done_text()}")
    console.print("  " + counts.states_text())
    if len(study.directions) > 1:
        _print_front(study, console)
    else:
        try:
            best = study.best_trial
            console.print(
                f"  best: trial {best.number} value={best.value:.6g} params={best.params}", markup=False
            )
        except ValueError:
            console.print("  best: no completed trial yet")
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if running:
        table = Table(title="running trials")
        for column in ("trial", "worker", "epochs done", "params"):
            table.add_column(column, no_wrap=column != "params")  # params wrap between parameters only
        for t in running:
            table.add_row(
                str(t.number),
                str(t.system_attrs.get(WORKER_ATTR, "?")),
                str(len(t.intermediate_values)),
                "  ".join(f"{k}={v}" for k, v in t.params.items()),
            )
        console.print(table)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for t in failed[-5:]:
        reason = t.system_attrs.get("fail_reason", "unknown reason")  # may hold [brackets]: no markup
        console.print(f"  trial {t.number} FAIL: {reason}", markup=False)
    if failed:
        hint = f"  (a failed trial's traceback: hpo status {study.study_name} --trial K)"
        console.print(hint, markup=False)


def print_trial(study: optuna.Study, number: int, console: Console | None = None) -> None:
    """One trial in full (``hpo status NAME --trial K``): state, parameters, value(s), worker, the
    last epoch's metrics, and for a failed trial its reason and stored traceback."""
    console = console or report_console()
    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    if trial is None:
        raise HpoError(
            f"study {study.study_name!r} has no trial {number} (fix: --trial 0 to {len(trials) - 1})"
            if trials
            else f"study {study.study_name!r} has no trials yet"
        )
    record = trial_record(trial)
    lines = [f"trial {number} of study {study.study_name}: {record['state']}"]
    if record["values"] is not None:
        values = "  ".join(
            f"{n}={v:.6g}" for n, v in zip(objective_names(study), record["values"], strict=True)
        )
        lines.append(f"  values: {values}")
    lines.append(f"  params: {json.dumps(record['params'])}")
    if record["duration_s"] is not None:
        lines.append(f"  duration: {record['duration_s']:.1f} s")
    if record["worker"]:
        lines.append(f"  worker: {record['worker']}")
    if record["retried_from"] is not None:
        lines.append(f"  retries trial {record['retried_from']} (whose worker died)")
    curves = trial_curves(trial, _study_metric(study))  # a failed trial's too: kept as reported
    if curves:
        epochs = max(max(c) for c in curves.values() if c)
        last = "  ".join(f"{n}={c[max(c)]:.6g}" for n, c in curves.items() if c)
        lines.append(f"  epochs reported: {epochs}; last: {last}")
    if record["fail_reason"]:
        lines.append(f"  fail reason: {record['fail_reason']}")
    if record["traceback"]:
        lines.append("  traceback (as the worker stored it):")
        lines += ["    " + line for line in str(record["traceback"]).rstrip().splitlines()]
    for line in lines:
        console.print(line, markup=False, soft_wrap=True)
