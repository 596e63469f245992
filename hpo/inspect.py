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

from hpo.errors import HpoError
from hpo.studies import trial_counts
from hpo.worker import WORKER_ATTR


def load(storage: BaseStorage, study_name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage)) or "none"
        raise HpoError(f"no study named {study_name!r} in this storage (studies there: {names})") from None


def best_trial(study: optuna.Study) -> dict[str, Any]:
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


def _duration(trial: FrozenTrial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trial_record(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": trial.params,
        "datetime_start": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "datetime_complete": trial.datetime_complete.isoformat() if trial.datetime_complete else None,
        "duration_s": _duration(trial),
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "metrics": trial.user_attrs.get("metrics", {}),
        "fail_reason": trial.system_attrs.get("fail_reason"),
        "worker": trial.system_attrs.get(WORKER_ATTR),
        "retried_from": trial.system_attrs.get("failed_trial"),
    }


def export(study: optuna.Study, fmt: str) -> str:
    trials = study.get_trials(deepcopy=False)
    records = [trial_record(t) for t in trials]
    if fmt == "json":
        return json.dumps({"study": study.study_name, "trials": records}, indent=2, default=str) + "\n"
    param_names = sorted({name for t in trials for name in t.params})
    columns = [
        "number",
        "state",
        "value",
        "duration_s",
        "datetime_start",
        "datetime_complete",
        *[f"params_{n}" for n in param_names],
        "fail_reason",
        "worker",
    ]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        params = record["params"]
        writer.writerow(
            [
                record["number"],
                record["state"],
                record["value"],
                record["duration_s"],
                record["datetime_start"],
                record["datetime_complete"],
                *[params.get(n, "") for n in param_names],
                record["fail_reason"] or "",
                record["worker"] or "",
            ]
        )
    return out.getvalue()


def print_studies(storage: BaseStorage, console: Console | None = None) -> None:
    console = console or Console()
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=True)
    if not summaries:
        console.print("no studies in this storage (create one with `hpo create-study STUDY_FILE`)")
        return
    table = Table(title="studies")
    for column in ("study", "direction", "trials", "best value"):
        table.add_column(column)
    for s in summaries:
        best = f"{s.best_trial.value:.6g}" if s.best_trial and s.best_trial.value is not None else "-"
        table.add_row(s.study_name, s.direction.name.lower(), str(s.n_trials), best)
    console.print(table)


def print_status(study: optuna.Study, n_trials: int, console: Console | None = None) -> None:
    console = console or Console()
    counts = trial_counts(study)
    finished = counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"]
    console.print(f"study [bold]{study.study_name}[/bold]: {n_trials} trials planned, {finished} finished")
    console.print("  " + "  ".join(f"{state.lower()}={n}" for state, n in counts.items()))
    try:
        best = study.best_trial
        console.print(f"  best: trial {best.number} value={best.value:.6g} params={best.params}")
    except ValueError:
        console.print("  best: no completed trial yet")
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if running:
        table = Table(title="running trials")
        for column in ("trial", "worker", "epochs done", "params"):
            table.add_column(column)
        for t in running:
            table.add_row(
                str(t.number),
                str(t.system_attrs.get(WORKER_ATTR, "?")),
                str(len(t.intermediate_values)),
                str(t.params),
            )
        console.print(table)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    for t in failed[-5:]:
        console.print(f"  trial {t.number} FAIL: {t.system_attrs.get('fail_reason', 'unknown reason')}")
