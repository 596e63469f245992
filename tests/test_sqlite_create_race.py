"""Several processes opening one new SQLite database at the same moment (workers and
``hpo create-study`` started together) all succeed: Optuna's CREATE TABLE ran in each, and the
loser failed with "table ... already exists" before hpo serialised it (hpo.storage)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import optuna

PROCESSES = 6
ROUNDS = 4


def _open_and_create(
    url: str, name: str, barrier: multiprocessing.synchronize.Barrier, errors: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    from hpo.storage import open_storage

    try:
        barrier.wait(timeout=60)
        storage = open_storage(url)
        optuna.create_study(study_name=name, storage=storage)
    except BaseException as exc:  # reported to the test, whatever it is
        errors.put(f"{type(exc).__name__}: {exc}")


def test_processes_creating_one_new_sqlite_database_together_all_succeed(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for round_ in range(ROUNDS):
        url = f"sqlite:///{tmp_path / f'race{round_}.db'}"
        barrier = context.Barrier(PROCESSES)
        errors = context.Queue()
        procs = [
            context.Process(target=_open_and_create, args=(url, f"s{k}", barrier, errors))
            for k in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        assert failures == [], failures
        assert [p.exitcode for p in procs] == [0] * PROCESSES
        names = {s.study_name for s in optuna.get_all_study_summaries(url)}
        assert names == {f"s{k}" for k in range(PROCESSES)}
