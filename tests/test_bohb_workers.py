"""BOHB through hpo's real worker processes on a real PostgreSQL: shared, exact, resumable."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import run_cli, start_cli
from optuna.trial import FrozenTrial, TrialState

from hpo.bohb import SLOT_ATTR, HyperbandSchedule, budget_epochs
from hpo.objective import BUDGET_ATTR
from hpo.worker import WORKER_ATTR

pytestmark = pytest.mark.postgres

SCHEDULE = HyperbandSchedule(1, 9, 3)  # brackets [9, 3, 1] at (1, 3, 9), [3, 1] at (3, 9), [3] at 9


def bohb_study(directory: Path, name: str, n_trials: int, sleep: float) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        "objective: hpo_bohb_objectives:branin_epochs\n"
        f"settings: {{sleep: {sleep}}}\n"
        "search_space:\n"
        "  x: {type: float, low: -5, high: 10}\n"
        "  y: {type: float, low: 0, high: 15}\n"
        "metric: loss\n"
        "direction: minimize\n"
        f"n_trials: {n_trials}\n"
        "budget: {max_epochs: 9}\n"
        "sampler: {name: bohb, seed: 3, options: {eta: 3}}\n"
    )
    return path


def worker_args(name: str, url: str, *extra: str) -> list[str]:
    return ["worker", "--study-name", name, "--storage", url, "--no-progress", *extra]


def current_attempts(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Each slot's latest trial (a re-queued trial replaces the one that was interrupted)."""
    latest: dict[tuple[int, int, int], FrozenTrial] = {}
    for trial in trials:
        slot = trial.system_attrs[SLOT_ATTR]
        key = (slot["bracket"], slot["stage"], slot["slot"])
        if key not in latest or trial.number > latest[key].number:
            latest[key] = trial
    return sorted(latest.values(), key=lambda t: t.number)


def check_plan(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """Every trial sits in its own slot of hpbandster's plan, trained its budget, and every
    promotion took the best configurations of the finished stage before it."""
    decisions = {
        key: value
        for key, value in study._storage.get_study_system_attrs(study._study_id).items()
        if key.startswith("hpo:bohb:promoted:")
    }
    rungs: dict[tuple[int, int], list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        slot = trial.system_attrs[SLOT_ATTR]
        rungs[(slot["bracket"], slot["stage"])].append(trial)
    created: dict[tuple[int, ...], dict[str, Any]] = {}
    for trial in trials:
        slot = trial.system_attrs[SLOT_ATTR]
        if not slot["promoted"]:
            assert tuple(slot["config"]) == (slot["bracket"], slot["stage"], slot["slot"])
            created[tuple(slot["config"])] = trial.params
    for (bracket, stage), members in sorted(rungs.items()):
        plan = SCHEDULE.bracket(bracket)
        slots = sorted(t.system_attrs[SLOT_ATTR]["slot"] for t in members)
        assert slots == list(range(len(members))) and len(members) <= plan.num_configs[stage]
        for trial in members:
            assert trial.system_attrs[SLOT_ATTR]["budget"] == plan.budgets[stage]
            assert trial.system_attrs[BUDGET_ATTR] == budget_epochs(plan.budgets[stage])
            assert len(trial.intermediate_values) == trial.system_attrs[BUDGET_ATTR]  # trained that long
            config = tuple(trial.system_attrs[SLOT_ATTR]["config"])
            assert trial.params == created[config]  # a promoted configuration keeps its parameters
        if stage == 0:
            continue
        previous = rungs[(bracket, stage - 1)]
        assert len(previous) == plan.num_configs[stage - 1]  # a stage starts only after the one before
        best = sorted(previous, key=lambda t: t.values[0])[: plan.num_configs[stage]]
        decided = [tuple(c) for c in decisions[f"hpo:bohb:promoted:{bracket}:{stage}"]]
        assert sorted(decided) == sorted(tuple(t.system_attrs[SLOT_ATTR]["config"]) for t in best)
        by_slot = sorted(members, key=lambda t: t.system_attrs[SLOT_ATTR]["slot"])
        promoted = [tuple(t.system_attrs[SLOT_ATTR]["config"]) for t in by_slot]
        assert promoted == decided[: len(members)]


def test_two_workers_share_one_bohb_study_with_exact_counts(tmp_path: Path, postgres_url: str) -> None:
    path = bohb_study(tmp_path, "bohb_pair", n_trials=40, sleep=0.05)
    # both are given the study file, as users on two machines would do; one of them creates it
    workers = [start_cli(["worker", str(path), "--storage", postgres_url, "--no-progress"], cwd=tmp_path)]
    workers.append(start_cli(["worker", str(path), "--storage", postgres_url, "--no-progress"], cwd=tmp_path))
    for worker in workers:
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, out
    study = optuna.load_study(study_name="bohb_pair", storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == 40 and Counter(t.state for t in trials) == {TrialState.COMPLETE: 40}
    assert len({t.system_attrs[WORKER_ATTR] for t in trials}) == 2, "both workers should have trained"
    check_plan(study, trials)


def test_resumed_study_continues_the_same_bracket_plan(tmp_path: Path, postgres_url: str) -> None:
    straight_file = bohb_study(tmp_path, "straight", n_trials=26, sleep=0.0)
    resumed_file = bohb_study(tmp_path, "resumed", n_trials=26, sleep=0.0)
    done = run_cli(["worker", str(straight_file), "--storage", postgres_url, "--no-progress"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # Stop after 11 trials: inside bracket 0's second stage, its promotions already decided.
    first = run_cli(
        ["worker", str(resumed_file), "--storage", postgres_url, "--no-progress", "--n-trials", "11"],
        cwd=tmp_path,
    )
    assert first.returncode == 0 and "ran its 11 trial(s)" in first.stdout, first.stdout + first.stderr
    stopped = optuna.load_study(study_name="resumed", storage=postgres_url).get_trials()
    assert Counter(t.state for t in stopped) == {TrialState.COMPLETE: 11, TrialState.WAITING: 15}
    # every worker has stopped; a new one, given only the study's name, picks the plan up
    second = run_cli(worker_args("resumed", postgres_url), cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr

    straight = optuna.load_study(study_name="straight", storage=postgres_url)
    resumed = optuna.load_study(study_name="resumed", storage=postgres_url)
    for study in (straight, resumed):
        check_plan(study, study.get_trials())
    a, b = straight.get_trials(), resumed.get_trials()
    assert [t.system_attrs[SLOT_ATTR] for t in a] == [t.system_attrs[SLOT_ATTR] for t in b]
    assert [(t.params, t.value) for t in a] == [(t.params, t.value) for t in b]
    assert {t.system_attrs[SLOT_ATTR]["stage"] for t in b[11:]} == {0, 1, 2}


def test_interrupted_trial_is_requeued_into_its_own_slot(tmp_path: Path, postgres_url: str) -> None:
    path = bohb_study(tmp_path, "bohb_stop", n_trials=14, sleep=0.4)
    storage = optuna.storages.RDBStorage(postgres_url)  # the schema exists before the worker starts
    victim = start_cli(["worker", str(path), "--storage", postgres_url, "--no-progress"], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline and victim.poll() is None, "the worker did not create the study"
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name="bohb_stop", storage=storage)
            break
        time.sleep(0.2)

    def half_way_promoted(trial: FrozenTrial) -> bool:  # a stage-1 (3-epoch) trial, 1 or 2 epochs in
        slot = trial.system_attrs.get(SLOT_ATTR) or {}
        return slot.get("stage") == 1 and 1 <= len(trial.intermediate_values) < 3

    while not any(half_way_promoted(t) for t in study.get_trials(states=(TrialState.RUNNING,))):
        assert time.monotonic() < deadline and victim.poll() is None, "the worker did not get going"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGTERM)
    out, _ = victim.communicate(timeout=60)
    assert "interrupted by SIGTERM" in out, out
    finish = run_cli(worker_args("bohb_stop", postgres_url), cwd=tmp_path)
    assert finish.returncode == 0, finish.stdout + finish.stderr

    trials = study.get_trials()
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert retry.system_attrs[SLOT_ATTR] == failed.system_attrs[SLOT_ATTR]
    assert failed.system_attrs[SLOT_ATTR]["promoted"]
    current = current_attempts(trials)
    assert len(current) == 14 and all(t.state == TrialState.COMPLETE for t in current)
    check_plan(study, current)
