"""Several processes opening one new SQLite database at the same moment (workers and
``hpo create-study`` started together) all succeed: Optuna's CREATE TABLE ran in each, and the
loser failed with "table ... already exists" before hpo serialised it (hpo.storage). A plain
Optuna process (optuna-dashboard, ``optuna create-study``) creating the file at that moment does
not take hpo's turn; hpo retries and opens what it made."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from hpo.storage import open_storage

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


def test_hpo_opening_a_new_sqlite_database_that_plain_optuna_creates_meanwhile_succeeds(
    tmp_path: Path,
) -> None:
    # optuna-dashboard or `optuna create-study` do not take hpo's turn at creating a new file. Here
    # a real Optuna process creates the tables between hpo's check that they are missing and its
    # CREATE TABLE, every time (the window the race needs, held open): hpo's CREATE TABLE fails
    # with "table studies already exists", and hpo opens the database the other process made.
    url = f"sqlite:///{tmp_path / 'meanwhile.db'}"
    interleaved: list[int] = []

    def create_elsewhere_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("CREATE TABLE studies") and not interleaved:
            other = subprocess.run(
                [sys.executable, "-c", f"import optuna; optuna.storages.RDBStorage({url!r})"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            interleaved.append(other.returncode)

    sqlalchemy.event.listen(sqlalchemy.Engine, "before_cursor_execute", create_elsewhere_first)
    try:
        storage = open_storage(url)
    finally:
        sqlalchemy.event.remove(sqlalchemy.Engine, "before_cursor_execute", create_elsewhere_first)
    assert interleaved == [0], "the other process created the tables inside hpo's window"
    optuna.create_study(study_name="after", storage=storage)
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["after"]
