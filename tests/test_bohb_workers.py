"""BOHB through hpo's real worker processes on a real PostgreSQL: shared, exact, resumable."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import run_cli, start_cli
from hpo_bohb_objectives import branin
from optuna.trial import FrozenTrial, TrialState

from hpo._rdb import WORKER_ATTR
from hpo.bohb import SLOT_ATTR, BOHBSampler, HyperbandSchedule, budget_epochs, plan_for
from hpo.objective import BUDGET_ATTR
from hpo.space import parse_space, suggest

pytestmark = pytest.mark.postgres

SCHEDULE = HyperbandSchedule(1, 9, 3)  # brackets [9, 3, 1] at (1, 3, 9), [3, 1] at (3, 9), [3] at 9


def bohb_study(directory: Path, name: str, n_trials: int, sleep: float, max_epochs: int = 9) -> Path:
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
        f"budget: {{max_epochs: {max_epochs}}}\n"
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


def check_plan(
    study: optuna.Study, trials: list[FrozenTrial], schedule: HyperbandSchedule = SCHEDULE
) -> None:
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
        plan = schedule.bracket(bracket)
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


@pytest.mark.slow  # sixteen processes (8 workers, their trainers): 40 to 90 s on 2 busy cores
def test_eight_workers_run_one_whole_hyperband_cycle_exactly(tmp_path: Path, postgres_url: str) -> None:
    """The issue's case: budgets 1..27, eta 3, n_trials = one cycle (65 evaluations, 405 epochs, 8 of
    them at 27 epochs), 8 workers at once. Every bracket's last rung completes: nothing opens a
    bracket that the trials left cannot finish, and no trial takes two slots."""
    schedule = HyperbandSchedule(1, 27, 3)
    cycle = schedule.cycle()
    n_trials = sum(b.evaluations for b in cycle)
    assert (n_trials, sum(b.total_budget for b in cycle)) == (65, 405)
    assert [(b.index, filled) for b, filled in plan_for(schedule, n_trials)] == [
        (0, 40),
        (1, 13),
        (2, 8),
        (3, 4),
    ]
    path = bohb_study(tmp_path, "bohb_eight", n_trials=n_trials, sleep=0.01, max_epochs=27)
    create = run_cli(["create-study", str(path), "--storage", postgres_url], cwd=tmp_path)
    assert create.returncode == 0, create.stdout + create.stderr
    workers = [start_cli(["worker", str(path), "--storage", postgres_url, "--no-progress"], cwd=tmp_path)]
    workers += [
        start_cli(["worker", str(path), "--storage", postgres_url, "--no-progress"], cwd=tmp_path)
        for _ in range(7)
    ]
    for worker in workers:
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, out

    study = optuna.load_study(study_name="bohb_eight", storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == n_trials and Counter(t.state for t in trials) == {TrialState.COMPLETE: n_trials}
    keys = Counter(
        (
            t.system_attrs[SLOT_ATTR]["bracket"],
            t.system_attrs[SLOT_ATTR]["stage"],
            t.system_attrs[SLOT_ATTR]["slot"],
        )
        for t in trials
    )
    assert set(keys.values()) == {1}, "a slot was filled twice"
    filled = Counter((bracket, stage) for bracket, stage, _ in keys)
    assert filled == {(b.index, stage): n for b in cycle for stage, n in enumerate(b.num_configs)}
    budgets = [t.system_attrs[SLOT_ATTR]["budget"] for t in trials]
    assert budgets.count(27.0) == 8 and sum(budgets) == 405
    assert sum(len(t.intermediate_values) for t in trials) == 405  # epochs actually trained
    assert len({t.system_attrs[WORKER_ATTR] for t in trials}) >= 2, "the workers should have shared the study"
    check_plan(study, trials, schedule)


# --------------------------------------------------------------------------- eight threads, one database

BRANIN = parse_space(
    {"x": {"type": "float", "low": -5, "high": 10}, "y": {"type": "float", "low": 0, "high": 15}}, "branin"
)


EPOCH_S = 0.05  # seconds per epoch, times 0.2 to 3 per trial: long next to sampling one (~0.1 s)


def claim(study: optuna.Study) -> int | None:
    """hpo's claim, with Optuna's own calls: one queued trial, re-queued ones first, to RUNNING."""
    waiting = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,))
    for trial in sorted(waiting, key=lambda t: ("failed_trial" not in t.system_attrs, t.number)):
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            if study._storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
                return trial._trial_id
    return None


def thread_worker(
    url: str, name: str, schedule: HyperbandSchedule, n_trials: int, interrupted: threading.Event
) -> None:
    """What ``hpo worker`` does, in a thread with its own database connections (as a process has):
    claim a queued trial, a BOHB sampler seeded by its number, train its budget, tell. The first
    worker to get a promoted trial is stopped half-way: its trial is failed and re-queued."""
    study = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url))
    while True:
        trial_id = claim(study)
        if trial_id is None:
            return  # every trial is claimed
        number = study._storage.get_trial_number_from_id(trial_id)
        study.sampler = BOHBSampler(
            BRANIN,
            min_budget=schedule.min_budget,
            max_budget=schedule.max_budget,
            seed=number,
            n_trials=n_trials,
            wait_timeout=60,
        )
        trial = optuna.Trial(study, trial_id)  # before_trial: the slot (waiting for one if need be)
        params = suggest(trial, BRANIN)
        slot = study._storage.get_trial_system_attrs(trial_id)[SLOT_ATTR]
        epochs = budget_epochs(slot["budget"])
        pace = EPOCH_S * random.Random(number).uniform(0.2, 3)  # trials of a stage end apart
        for epoch in range(1, epochs + 1):
            if slot["stage"] > 0 and epoch == 2 and not interrupted.is_set():
                interrupted.set()
                frozen = study.tell(trial, state=TrialState.FAIL)
                optuna.storages.RetryHeartbeatStaleTrialCallback()(study, frozen)  # re-queued, same slot
                return  # this worker is gone
            time.sleep(pace)
            trial.report(branin(params["x"], params["y"], epoch / schedule.max_budget), epoch)
        study.tell(trial, branin(params["x"], params["y"], epochs / schedule.max_budget))


# hpbandster calls ConfigSpace 0.x names; the sampler silences that per call, which threads can race.
@pytest.mark.filterwarnings("ignore:Please use:DeprecationWarning")
def test_eight_parallel_workers_one_cycle_every_slot_once_and_the_whole_budget(postgres_url: str) -> None:
    """The issue's case at thread speed: 8 workers with their own connections, 1..27 epochs, eta 3,
    n_trials = one cycle (65 slots, 405 epochs, 8 at 27), one worker stopped inside a promoted trial.
    Every slot is filled once (a retry refills its own), every bracket reaches its last stage."""
    schedule = HyperbandSchedule(1, 27, 3)
    cycle = schedule.cycle()
    n_trials = sum(b.evaluations for b in cycle)
    study = optuna.create_study(study_name="bohb_threads", storage=postgres_url)
    for _ in range(n_trials):
        study.enqueue_trial({})  # hpo queues the study's n_trials when it creates it
    interrupted = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            thread_worker(postgres_url, "bohb_threads", schedule, n_trials, interrupted)
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)
            raise

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert interrupted.is_set(), "no worker was stopped inside a promoted trial"

    trials = study.get_trials()
    slotted = [t for t in trials if isinstance(t.system_attrs.get(SLOT_ATTR), dict)]
    current = latest(slotted)
    assert len(current) == n_trials and all(t.state == TrialState.COMPLETE for t in current.values())
    assert Counter((b, s) for b, s, _ in current) == {
        (b.index, stage): n for b in cycle for stage, n in enumerate(b.num_configs)
    }
    budgets = [t.system_attrs[SLOT_ATTR]["budget"] for t in current.values()]
    assert budgets.count(27.0) == 8 and sum(budgets) == 405
    assert sum(len(t.intermediate_values) for t in current.values()) == 405
    # A slot held by more than one trial: only the interrupted one and its retry (taken over by a
    # waiting worker, or not); every queued trial was used.
    superseded = [t for t in slotted if t not in current.values()]
    assert [t.state for t in superseded] == [TrialState.FAIL]
    (stopped,) = superseded
    key = slot_key(stopped)
    assert (
        current[key].params == stopped.params and current[key].system_attrs["failed_trial"] == stopped.number
    )
    assert stopped.system_attrs[SLOT_ATTR]["stage"] > 0
    # without a slot: at most the retry, if a waiting worker took its slot over (hpo:bohb:adopted_by)
    assert Counter(t.state for t in trials if t not in slotted) <= Counter({TrialState.FAIL: 1})
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    check_plan(study, list(current.values()), schedule)


def slot_key(trial: FrozenTrial) -> tuple[int, int, int]:
    slot = trial.system_attrs[SLOT_ATTR]
    return (slot["bracket"], slot["stage"], slot["slot"])


def latest(trials: list[FrozenTrial]) -> dict[tuple[int, int, int], FrozenTrial]:
    """Each slot's current attempt: the highest (attempt, trial number)."""
    current: dict[tuple[int, int, int], FrozenTrial] = {}
    for trial in trials:
        rank = (trial.system_attrs[SLOT_ATTR].get("attempt", 0), trial.number)
        key = slot_key(trial)
        if key not in current or rank > (
            current[key].system_attrs[SLOT_ATTR].get("attempt", 0),
            current[key].number,
        ):
            current[key] = trial
    return current
